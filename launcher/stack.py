"""The whole stack as child processes: MLflow server, API, worker(s)."""

from __future__ import annotations

import configparser
import os
from pathlib import Path

from sqlalchemy.orm import Session

from jobs import access
from jobs.db import get_engine
from jobs.models import DEFAULT_PROJECT
from jobs.settings import Settings
from launcher.processes import (
    ProcessGroup,
    api_command,
    mlflow_command,
    reaper_command,
    run_migrations,
    wait_http,
    wait_worker_ready,
    worker_command,
)


def stack_env(s: Settings) -> dict[str, str]:
    """The environment every child gets: the resolved settings, so that all agree."""
    env = os.environ | {
        "DESCENT_HOME": str(s.descent_home.resolve()),
        "DATABASE_URL": s.database_url,
        "BROKER_URL": s.broker_url,
        "QUEUE_NAME": s.queue_name,
        "EVENTS_URL": s.events_url,
        "OPTUNA_STORAGE_URL": s.optuna_storage_url,
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
        "MLFLOW_UI_URL": s.mlflow_ui_url,
        "MLFLOW_BACKEND_STORE_URI": s.mlflow_backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": s.mlflow_artifacts_destination,
        "MLFLOW_AUTH_ENABLED": str(s.mlflow_auth_enabled).lower(),
        "API_PORT": str(s.api_port),
        "API_WORKERS": str(s.api_workers),
        "MLFLOW_PORT": str(s.mlflow_port),
        "LEASE_S": str(s.lease_s),
        "REAPER_INTERVAL_S": str(s.reaper_interval_s),
        "UNCLAIMED_REQUEUE_S": str(s.unclaimed_requeue_s),
        "CHECKPOINT_MIN_INTERVAL_S": str(s.checkpoint_min_interval_s),
        "CHECKPOINT_INLINE_MAX_BYTES": str(s.checkpoint_inline_max_bytes),
        "DATASET_INLINE_MAX_BYTES": str(s.dataset_inline_max_bytes),
        "ARTIFACT_STORE_WAIT_S": str(s.artifact_store_wait_s),
        "ARTIFACT_SWEEP_INTERVAL_S": str(s.artifact_sweep_interval_s),
        "ARTIFACT_ORPHAN_GRACE_S": str(s.artifact_orphan_grace_s),
        "PROGRESS_INTERVAL_S": str(s.progress_interval_s),
        "WORKER_HEARTBEAT_INTERVAL_S": str(s.worker_heartbeat_interval_s),
        "ALLOW_UNKNOWN_POOLS": str(s.allow_unknown_pools).lower(),
        "WORKER_METRICS_PORT": str(s.worker_metrics_port),  # one worker per port: further workers serve none
        "WORKER_METRICS_HOST": s.worker_metrics_host,
        "DATABASE_POOL_SIZE": str(s.database_pool_size),
        "DATABASE_POOL_TIMEOUT_S": str(s.database_pool_timeout_s),
        "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_S": str(s.database_idle_in_transaction_timeout_s),
        "MAX_STREAMS_PER_KEY": str(s.max_streams_per_key),
        "AUTH_FAILURE_LIMIT": str(s.auth_failure_limit),
        "AUTH_FAILURE_WINDOW_S": str(s.auth_failure_window_s),
        "SYSTEM_METRICS_INTERVAL_S": str(s.system_metrics_interval_s),
        "LOG_MODEL": str(s.log_model).lower(),
        "METRICS_MAX_POINTS_PER_S": str(s.metrics_max_points_per_s),
        "METRICS_BURST_S": str(s.metrics_burst_s),
        "TORCH_THREADS_PER_JOB": str(s.torch_threads_per_job),
        "DATASETS_DIR": str(s.datasets_dir),
        "DATASETS_DOWNLOAD": str(s.datasets_download).lower(),
        "DATASETS_MIRROR": s.datasets_mirror,
        "DATASETS_TIMEOUT_S": str(s.datasets_timeout_s),
        "DATASETS_LOCK_WAIT_S": str(s.datasets_lock_wait_s),
        "PYTHONUNBUFFERED": "1",
        # MLflow's server-side job runner (GenAI evaluation, trace roll-ups) is not used
        # by Descent and would start eight more processes beside the server.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    # MLflow 3 reports usage to its makers from every process that imports it (its client, its
    # server, its UI): a self-hosted Descent keeps that to itself unless its operator says so.
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if s.fresh_process_per_job is not None:
        env["FRESH_PROCESS_PER_JOB"] = str(s.fresh_process_per_job).lower()
    if s.datasets_checksums is not None:
        env["DATASETS_CHECKSUMS"] = str(s.datasets_checksums)
    if s.bootstrap_key is not None:
        env["DESCENT_BOOTSTRAP_KEY"] = s.bootstrap_key.get_secret_value()
    if s.mlflow_auth_enabled and not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(local_mlflow_auth_config(s))
    return env


MLFLOW_AUTH_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "mlflow-auth.ini"


def local_mlflow_auth_config(s: Settings, auth_cache_s: int | None = None) -> Path:
    """MLflow's basic-auth app as docker-compose configures it (deploy/mlflow-auth.ini: no
    permission by default, a login checked once a minute), its users kept in DESCENT_HOME:
    `make up` with MLFLOW_AUTH_ENABLED=true and no MLFLOW_AUTH_CONFIG_PATH of its own.
    (MLflow's packaged file would let every login read every experiment, and hash-check
    the password at every request.) `auth_cache_s`: the login cache instead of the file's
    (bench/job_cost.py measures it)."""
    config = configparser.ConfigParser()
    config.read(MLFLOW_AUTH_CONFIG)
    home = s.descent_home.resolve()
    config["mlflow"]["database_uri"] = f"sqlite:///{home / 'mlflow-auth.db'}"
    if auth_cache_s is not None:
        config["mlflow"]["auth_cache_ttl_seconds"] = str(auth_cache_s)
    path = home / "mlflow-auth.ini"
    home.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        config.write(out)
    return path


def start_stack(s: Settings, log_dir: Path, workers: int = 1, concurrency: int = 1,
                start_mlflow: bool = True, group: ProcessGroup | None = None,
                worker_pools: list[str] | None = None) -> ProcessGroup:  # fmt: skip
    """Migrate, then start MLflow, the API, `workers` workers and the reaper; wait until each is ready.

    `worker_pools`: one worker per entry, serving that device pool (["cpu", "gpu"]: two
    workers, worker-0 in pool cpu, worker-1 in gpu), in place of `workers` workers of
    WORKER_POOL. The workers start side by side (each imports torch for seconds), and
    each is ready once its first heartbeat is recorded: its pool takes jobs from then on.

    Into `group` if given (`make up` holds it before, to stop it from a signal handler):
    a stop requested meanwhile ends the waiting with StopRequested, everything stopped."""
    s.ensure_home()
    env = stack_env(s)
    pools = list(worker_pools) if worker_pools is not None else [s.worker_pool] * workers
    workers = len(pools)
    if workers > 1 and not s.torch_threads_per_job:
        # These workers share this machine's cores: each job gets its share of all their slots.
        env["TORCH_THREADS_PER_JOB"] = str(max(1, len(os.sched_getaffinity(0)) // (workers * concurrency)))
    run_migrations(env)
    group = group if group is not None else ProcessGroup(log_dir=log_dir, env=env)
    try:
        if start_mlflow:
            mlflow = group.start("mlflow", mlflow_command(s))
            wait_http(f"{s.mlflow_tracking_uri}/health", mlflow, timeout_s=120, group=group)
        api = group.start("api", api_command(s))
        wait_http(f"http://127.0.0.1:{s.api_port}/healthz", api, group=group)
        started = [group.start(f"worker-{i}", worker_command(s, concurrency, name=f"worker-{i}", pool=pool))
                   for i, pool in enumerate(pools)]  # fmt: skip
        for worker in started:
            wait_worker_ready(worker, group=group)
        group.start("reaper", reaper_command())
    except BaseException:
        group.stop_all()
        raise
    return group


def local_api_key(s: Settings) -> str:
    """The embedded stack's one key: a server-admin key (of the default project), kept in
    DESCENT_HOME/api-key (readable by its owner only) and reused while it is valid."""
    path = s.descent_home.resolve() / "api-key"
    with Session(get_engine(s.database_url)) as session, session.begin():
        if path.exists():
            key = path.read_text().strip()
            caller = access.authenticate(session=session, presented=key)
            if caller is not None and caller.server_admin:  # keys made before server admins existed: replaced
                return key
        access.ensure_project(session=session, name=DEFAULT_PROJECT)
        _, key = access.create_key(session=session, project=DEFAULT_PROJECT, server_admin=True,
                                   label="local (make up)")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
