"""The one settings object, read from environment variables.

Embedded defaults (SQLite, a SQLite-backed Celery broker, a local MLflow server
with a SQLite store, all under DESCENT_HOME) let one command run everything on a
laptop; docker-compose and `make up` with env vars point the same code at
PostgreSQL, Redis and a real MLflow server.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.pool_names import DEFAULT_POOL, POOL_NAME_MAX_LENGTH, POOL_NAME_PATTERN


# Values that documentation shows: a key or password equal to one of them is refused.
EXAMPLE_SECRETS = frozenset(
    {"change-me", "change-me-too", "change-me-three", "change-me-four", "changethis", "secret", "password"}
)
BOOTSTRAP_KEY_MIN_LENGTH = 32
BOOTSTRAP_KEY_MIN_DISTINCT = 8  # 32 random hex digits have fewer than 8 distinct ones about once in 10^7

# Per-step metric points one job sends MLflow per second at most (above: window aggregates).
# One MLflow server process (--workers 1, PostgreSQL store) spends ~150 us of CPU a point
# (bench/metrics_rate.py, 138-157 us over its levels): ~6,600 points/s with a core of its
# own. 32 jobs at this limit send 32 x 150 = 4,800 points/s, 72 % of that, leaving room for
# the epoch, system and diagnostics metrics and for the UI's and the API's reads.
METRICS_MAX_POINTS_PER_S_DEFAULT = 150.0


def bootstrap_key_problem(key: str) -> str | None:
    """Why this string cannot be the bootstrap key (it is a server-admin key, so it must be
    unguessable), or None. A rule that refuses the obvious: short, repetitive, an example."""
    if key.lower() in EXAMPLE_SECRETS:
        return "is an example value"
    if len(key) < BOOTSTRAP_KEY_MIN_LENGTH:
        return f"must be at least {BOOTSTRAP_KEY_MIN_LENGTH} random characters (it has {len(key)})"
    if len(set(key)) < BOOTSTRAP_KEY_MIN_DISTINCT:
        return f"is too repetitive to be random (fewer than {BOOTSTRAP_KEY_MIN_DISTINCT} different characters)"
    return None


API_WORKERS_DEFAULT_MAX = 4  # past this, more API processes mostly hold more PostgreSQL connections


def default_api_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), API_WORKERS_DEFAULT_MAX))


class Settings(BaseSettings):
    # A refused value is not repeated in the error: it may be a key or a password.
    model_config = SettingsConfigDict(extra="ignore", hide_input_in_errors=True)

    descent_home: Path = Field(Path(".descent"), description="Where the embedded stores live.")
    database_url: str = ""
    broker_url: str = ""
    queue_name: str = Field(
        "descent", description="Prefix of the Celery queues: the jobs of pool P go to `<QUEUE_NAME>.<P>`."
    )
    mlflow_port: int = 5000
    api_port: int = 8000
    mlflow_tracking_uri: str = ""
    mlflow_backend_store_uri: str = Field("", description="Store of the MLflow server that `make up` starts.")
    mlflow_artifacts_destination: str = ""
    mlflow_ui_url: str = Field("", description="Base of the run links shown to people.")
    default_experiment: str = Field(
        "descent", pattern=r"^[^/]+$", description="A job's experiment when it names none (as `<project>/descent`)."
    )
    mlflow_auth_enabled: bool = Field(
        False,
        description="MLflow runs its basic-auth app: each project gets an MLflow user that reads only its own "
        "experiments and models (Descent logs in as MLFLOW_TRACKING_USERNAME, an MLflow admin).",
    )
    optuna_storage_url: str = Field(
        "", description="Optuna's storage for studies; default: the database (PostgreSQL: schema `optuna`)."
    )
    events_url: str = Field(
        "", description="Redis for live job events (SSE); default: the broker when it is Redis, else none."
    )
    # Operator access: when set, this value is a server-admin API key (how the first key
    # reaches a fresh deployment). Never logged. Empty = none.
    bootstrap_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DESCENT_BOOTSTRAP_KEY", "bootstrap_key"), repr=False
    )

    # The API holds nothing between requests (limits, stream slots and caches live in Redis
    # and PostgreSQL), so it scales out by processes: uvicorn's workers on one machine,
    # replicas behind a load balancer across machines (README, "Scaling the API").
    api_workers: int = Field(
        default_factory=lambda: default_api_workers(), ge=1,
        description="API processes `make up` / `make api` start (uvicorn workers sharing the port); "
        "default: the cores this process may use, at most 4.",
    )  # fmt: skip

    # Admission: what one caller may hold at once, and how often a client may present bad keys.
    database_pool_size: int = Field(
        5, ge=1, description="PostgreSQL connections each API or worker process keeps; it opens up to "
        "twice as many as its load needs them, and keeps those too."
    )
    database_pool_timeout_s: float = Field(
        10.0, gt=0, description="How long a request waits for a pooled connection before a 503."
    )
    database_idle_in_transaction_timeout_s: float = Field(
        60.0, ge=0, description="PostgreSQL ends a session idle inside a transaction this long (0 = never)."
    )
    max_streams_per_key: int = Field(
        10, ge=1, description="Event streams one API key may hold open at once, across API processes."
    )
    auth_failure_limit: int = Field(
        20, ge=1, description="Requests with an invalid key one client address may make per window; then 429."
    )
    auth_failure_window_s: float = Field(60.0, gt=0, description="The window of AUTH_FAILURE_LIMIT.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies are refused with 413.")
    max_upload_bytes: int = Field(100_000_000, ge=1024, description="Larger dataset files are refused with 413.")

    # What this server agrees to run; a submission over a limit is a 422 naming it.
    max_epochs: int = Field(10_000, ge=1)
    max_total_steps: int = Field(10_000_000, ge=1)
    max_model_parameters: int = Field(50_000_000, ge=1)
    # Lanczos keeps ~20 float64 vectors of the model's size on the host; each one a double backward.
    max_hessian_parameters: int = Field(2_000_000, ge=1)
    max_dataset_samples: int = Field(1_000_000, ge=1)
    # Samples x values per sample: the dataset lives on the device as one tensor
    # (200 M float32 values = 800 MB), and long sequences multiply it.
    max_dataset_values: int = Field(200_000_000, ge=1)
    max_study_trials: int = Field(
        1000, ge=1, validation_alias=AliasChoices("MAX_STUDY_TRIALS", "MAX_STUDY_JOBS", "max_study_trials"),
        description="Trial jobs one study may run (configurations x repeats); MAX_STUDY_JOBS is its old name.",
    )  # fmt: skip
    # Diagnostics cost, in sample-parameter products (one sample through a model of P
    # parameters is P): a Hessian-vector product counts twice (a double backward), a
    # landscape point once, each over max_samples samples.
    max_diagnostics_cost: float = Field(
        1e13, gt=0, description="Largest estimated cost of a job's Hessian and landscape diagnostics together."
    )
    default_timeout_s: float = Field(
        24 * 3600.0, ge=0, description="timeout_s of a job that states none (0 = no default timeout)."
    )

    # What one project may hold at once (an admin overrides them per project:
    # PUT /v1/projects/{name}/limits); over one, a submission is a 429 naming it.
    max_active_jobs_per_project: int = Field(
        200, ge=1, description="Jobs (study trials included) one project may have queued or running."
    )
    max_study_parallelism_per_project: int = Field(
        32, ge=1, description="Sum of the parallelism of one project's running studies."
    )
    study_trials_per_advance: int = Field(
        16, ge=1, le=1000,
        description="Trial jobs one step of a study creates at most (an Optuna ask each): creating a study "
        "answers fast whatever its parallelism; the rest follow as trials end and at each reaper pass.",
    )  # fmt: skip
    # A page of 100,000 points is about 3.5 MB of JSON: what one answer may weigh. Readers
    # written before pages existed get a whole history up to that size.
    metrics_page_default: int = Field(
        100_000, ge=1, description="Points per page of GET /v1/jobs/{id}/metrics when the request names no limit."
    )
    metrics_page_max: int = Field(100_000, ge=1, description="Most points one page of GET /v1/jobs/{id}/metrics holds.")

    # Uploads (issue 14): what a file may declare is checked before anything is read, and the
    # reading itself happens in a child process whose memory and time are bounded here.
    max_upload_columns: int = Field(
        10_000, ge=2, description="Columns a CSV or Parquet upload may have, counted in its header before parsing."
    )
    max_classes: int = Field(
        1000, ge=2, description="Classes an uploaded dataset may have (a confusion matrix is classes x classes)."
    )
    max_class_name_chars: int = Field(100, ge=1, description="Longest class name (label value) an upload may have.")
    upload_parse_memory_bytes: int = Field(
        4 * 2**30, ge=256 * 2**20,
        description="Memory (RLIMIT_DATA) of the child process that reads an upload; a file needing more is a 413.",
    )  # fmt: skip
    upload_parse_timeout_s: float = Field(
        120.0, gt=0, description="Time the child process may take to read an upload; a slower file is a 413."
    )
    upload_parse_concurrency: int = Field(
        2, ge=1, description="Uploads one API process reads at once; more wait up to UPLOAD_PARSE_TIMEOUT_S, then 503."
    )

    # Worker behaviour.
    progress_interval_s: float = Field(0.5, gt=0, description="How often a running job writes progress and checks for cancel.")
    metrics_flush_interval_s: float = Field(1.0, gt=0, description="How often buffered metrics go to MLflow.")
    metrics_buffer_limit: int = Field(1_000_000, ge=1000, description="Metric points kept while MLflow is unreachable.")
    metrics_max_points_per_s: float = Field(
        METRICS_MAX_POINTS_PER_S_DEFAULT, ge=0,
        description="Per-step metric points a job sends MLflow per second at most: above it, window aggregates "
        "(README, 'Metrics at fleet rates'); 0 = every step whatever the rate.",
    )  # fmt: skip
    metrics_burst_s: float = Field(
        120.0, ge=0,
        description="Seconds of METRICS_MAX_POINTS_PER_S a job may send ahead of that rate before its windows "
        "begin: a short job, and the first minutes of a long one, log every step.",
    )  # fmt: skip
    log_model: bool = Field(True, description="Log the final model to MLflow at the end of a job.")
    mlflow_wait_at_end_s: float = Field(
        300.0, ge=0, description="How long a finished job waits for an unreachable MLflow to take its metrics."
    )

    # Operator views of a worker (see README, "Operating Descent").
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (one port per worker); 0 = off."
    )
    worker_metrics_host: str = Field(
        "127.0.0.1", description="Address the worker's /metrics listens on (0.0.0.0: every interface)."
    )
    system_metrics_interval_s: float = Field(
        10.0, ge=0, description="How often a job samples CPU, memory and GPU into its MLflow run; 0 = off."
    )
    fresh_process_per_job: bool | None = Field(
        None, description="Run each job in a new worker process, whose exit returns all its GPU memory; "
        "unset: only with a CUDA build of torch (a CPU-only build reuses processes).",
    )
    torch_threads_per_job: int = Field(
        0, ge=0, description="Threads of each job's torch and BLAS (numpy) work; 0 = the cores the worker "
        "may use divided by its concurrency, so that jobs sharing a machine do not fight over cores.",
    )

    # The dataset cache (issue 11): torchvision's files of the standard image sets, shared by the
    # workers of a machine (compose: the `datasets` volume). The worker fills it before a job's
    # trainer starts; `python -m api.admin fetch-datasets` fills it ahead (README, "The dataset cache").
    datasets_dir: Path | None = Field(None, description="The dataset cache; default: DESCENT_HOME/datasets.")
    datasets_download: bool = Field(
        True, description="A worker that lacks a set downloads it (checksums verified); false: the job fails at once."
    )
    datasets_mirror: str = Field(
        "", description="Base URL of an internal mirror replacing torchvision's: <base>/<set>/<file torchvision "
        "fetches>, e.g. <base>/cifar10/cifar-10-python.tar.gz; empty: torchvision's own mirrors.",
    )  # fmt: skip
    datasets_checksums: Path | None = Field(
        None, description="A JSON checksum table replacing the one built from torchvision's "
        "(worker/dataset_cache.py says its form); for a mirror serving other files, and for tests.",
    )  # fmt: skip
    datasets_timeout_s: float = Field(
        15.0, gt=0, description="Network timeout of each connect and read of a dataset download: offline fails fast."
    )
    datasets_lock_wait_s: float = Field(
        3600.0, gt=0, description="How long a worker waits for another one downloading the same set."
    )

    # Device pools (README, "Growing past one machine").
    worker_pool: str = Field(
        DEFAULT_POOL, min_length=1, max_length=POOL_NAME_MAX_LENGTH, pattern=POOL_NAME_PATTERN,
        description="The device pool this worker serves: it consumes the queue `<QUEUE_NAME>.<WORKER_POOL>` "
        "and claims only that pool's jobs.",
    )  # fmt: skip
    worker_heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often a worker says it is alive (GET /v1/pools); three missed: not live."
    )
    worker_row_retention_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Rows of workers gone this long are deleted by the reaper "
        "(each pool keeps its latest, so that it stays known).",
    )  # fmt: skip
    allow_unknown_pools: bool = Field(
        False, description="Accept jobs for a pool no worker has ever served (they wait for one); "
        "false: such a submission is a 422 naming the known pools.",
    )  # fmt: skip

    # Crash recovery.
    lease_s: float = Field(30.0, gt=0, description="A running job whose worker is silent this long is lost.")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often workers look for lost and stuck jobs.")
    unclaimed_requeue_s: float = Field(60.0, gt=0, description="A queued job nobody claimed this long is enqueued again.")
    checkpoint_min_interval_s: float = Field(
        5.0, ge=0, description="Take an offered checkpoint only if the last one is at least this old."
    )

    # Large state in MLflow's artifact store (README, "The object store"): small objects stay
    # in PostgreSQL rows (one round trip, no second system on a laptop); larger ones go to the
    # store behind the MLflow server and the row keeps the pointer, size and SHA-256.
    checkpoint_inline_max_bytes: int = Field(
        4 * 2**20, ge=0, description="Checkpoints up to this size stay in PostgreSQL; larger ones go to MLflow's "
        "artifact store (0: every checkpoint does).",
    )  # fmt: skip
    dataset_inline_max_bytes: int = Field(
        4 * 2**20, ge=0, description="Uploaded datasets (their stored NPZ) up to this size stay in PostgreSQL; larger "
        "ones go to MLflow's artifact store (0: every upload does).",
    )  # fmt: skip
    # Objects nothing points to (a crash between an object and its row, a delete that failed)
    # are reclaimed by the reaper (worker/artifact_sweeper.py).
    artifact_sweep_interval_s: float = Field(
        3600.0, ge=0, description="How often the reaper looks for checkpoint objects in the artifact store that "
        "no row points to (0: never).",
    )  # fmt: skip
    artifact_orphan_grace_s: float = Field(
        3600.0, gt=0, description="An object no row has pointed to for this long is deleted (it must be longer "
        "than any upload of a checkpoint or dataset takes).",
    )  # fmt: skip
    artifact_store_wait_s: float = Field(
        120.0, ge=0, description="How long a worker waits for an unreachable artifact store to give back a "
        "checkpoint or an upload before the job fails saying so.",
    )  # fmt: skip

    @field_validator("bootstrap_key")
    @classmethod
    def _bootstrap_key_is_random(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # empty: no bootstrap key (compose passes an unset variable as "")
        problem = bootstrap_key_problem(value.get_secret_value())
        if problem:
            raise ValueError(f"DESCENT_BOOTSTRAP_KEY {problem}; make one with `openssl rand -hex 32`")
        return value

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        home = self.descent_home.resolve()
        self.database_url = self.database_url or f"sqlite:///{home}/descent.db"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{home}/broker.db"
        self.mlflow_tracking_uri = self.mlflow_tracking_uri or f"http://127.0.0.1:{self.mlflow_port}"
        self.mlflow_backend_store_uri = self.mlflow_backend_store_uri or f"sqlite:///{home}/mlflow.db"
        self.mlflow_artifacts_destination = self.mlflow_artifacts_destination or str(home / "mlartifacts")
        if not self.optuna_storage_url:
            # Optuna names a table `studies` as Descent does: its own file, or its own schema.
            if self.database_url.startswith("sqlite"):
                self.optuna_storage_url = f"sqlite:///{home}/optuna.db"
            else:
                self.optuna_storage_url = self.database_url
        self.datasets_dir = self.datasets_dir or home / "datasets"
        if not self.events_url and self.broker_url.startswith(("redis://", "rediss://")):
            self.events_url = self.broker_url
        if not self.mlflow_ui_url and self.mlflow_tracking_uri.startswith(("http://", "https://")):
            self.mlflow_ui_url = self.mlflow_tracking_uri
        return self

    @property
    def uses_embedded_stores(self) -> bool:
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("sqla+sqlite")

    def ensure_home(self) -> None:
        if self.uses_embedded_stores or self.mlflow_backend_store_uri.startswith("sqlite"):
            self.descent_home.resolve().mkdir(parents=True, exist_ok=True)


settings = Settings()
