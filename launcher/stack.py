"""The whole stack as child processes: MLflow server, API, worker(s)."""

from __future__ import annotations

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
        "API_PORT": str(s.api_port),
        "MLFLOW_PORT": str(s.mlflow_port),
        "LEASE_S": str(s.lease_s),
        "REAPER_INTERVAL_S": str(s.reaper_interval_s),
        "UNCLAIMED_REQUEUE_S": str(s.unclaimed_requeue_s),
        "CHECKPOINT_MIN_INTERVAL_S": str(s.checkpoint_min_interval_s),
        "PROGRESS_INTERVAL_S": str(s.progress_interval_s),
        "WORKER_METRICS_PORT": str(s.worker_metrics_port),  # one worker per port: further workers serve none
        "SYSTEM_METRICS_INTERVAL_S": str(s.system_metrics_interval_s),
        "TORCH_THREADS_PER_JOB": str(s.torch_threads_per_job),
        "PYTHONUNBUFFERED": "1",
        # MLflow's server-side job runner (GenAI evaluation, trace roll-ups) is not used
        # by Descent and would start eight more processes beside the server.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    if s.fresh_process_per_job is not None:
        env["FRESH_PROCESS_PER_JOB"] = str(s.fresh_process_per_job).lower()
    if s.bootstrap_key is not None:
        env["DESCENT_BOOTSTRAP_KEY"] = s.bootstrap_key.get_secret_value()
    return env


def start_stack(s: Settings, log_dir: Path, workers: int = 1, concurrency: int = 1,
                start_mlflow: bool = True) -> ProcessGroup:  # fmt: skip
    """Migrate, then start MLflow, the API, `workers` workers and the reaper; wait until each is ready."""
    s.ensure_home()
    env = stack_env(s)
    if workers > 1 and not s.torch_threads_per_job:
        # These workers share this machine's cores: each job gets its share of all their slots.
        env["TORCH_THREADS_PER_JOB"] = str(max(1, len(os.sched_getaffinity(0)) // (workers * concurrency)))
    run_migrations(env)
    group = ProcessGroup(log_dir=log_dir, env=env)
    try:
        if start_mlflow:
            mlflow = group.start("mlflow", mlflow_command(s))
            wait_http(f"{s.mlflow_tracking_uri}/health", mlflow, timeout_s=120)
        api = group.start("api", api_command(s))
        wait_http(f"http://127.0.0.1:{s.api_port}/healthz", api)
        for i in range(workers):
            worker = group.start(f"worker-{i}", worker_command(s, concurrency, name=f"worker-{i}"))
            wait_worker_ready(worker)
        group.start("reaper", reaper_command())
    except BaseException:
        group.stop_all()
        raise
    return group


def local_api_key(s: Settings) -> str:
    """The embedded stack's one key: an admin key of the default project, kept in
    DESCENT_HOME/api-key (readable by its owner only) and reused while it is valid."""
    path = s.descent_home.resolve() / "api-key"
    with Session(get_engine(s.database_url)) as session, session.begin():
        if path.exists():
            key = path.read_text().strip()
            if access.authenticate(session=session, presented=key):
                return key
        access.ensure_project(session=session, name=DEFAULT_PROJECT)
        _, key = access.create_key(session=session, project=DEFAULT_PROJECT, admin=True, label="local (make up)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return key
