"""The one settings object, read from environment variables.

Embedded defaults (SQLite, a SQLite-backed Celery broker, a local MLflow server
with a SQLite store, all under DESCENT_HOME) let one command run everything on a
laptop; docker-compose and `make up` with env vars point the same code at
PostgreSQL, Redis and a real MLflow server.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    descent_home: Path = Field(Path(".descent"), description="Where the embedded stores live.")
    database_url: str = ""
    broker_url: str = ""
    queue_name: str = Field("descent", description="Celery queue the jobs go to.")
    mlflow_port: int = 5000
    api_port: int = 8000
    mlflow_tracking_uri: str = ""
    mlflow_backend_store_uri: str = Field("", description="Store of the MLflow server that `make up` starts.")
    mlflow_artifacts_destination: str = ""
    mlflow_ui_url: str = Field("", description="Base of the run links shown to people.")
    default_experiment: str = "descent"
    optuna_storage_url: str = Field(
        "", description="Optuna's storage for studies; default: the database (PostgreSQL: schema `optuna`)."
    )
    events_url: str = Field(
        "", description="Redis for live job events (SSE); default: the broker when it is Redis, else none."
    )
    # Operator access: when set, this value is an admin API key of the `default` project
    # (how the first key reaches a fresh deployment). Never logged.
    bootstrap_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("DESCENT_BOOTSTRAP_KEY", "bootstrap_key"), repr=False
    )
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
    max_study_jobs: int = Field(1000, ge=1, description="Trial jobs one study may run (configurations x repeats).")

    # Worker behaviour.
    progress_interval_s: float = Field(0.5, gt=0, description="How often a running job writes progress and checks for cancel.")
    metrics_flush_interval_s: float = Field(1.0, gt=0, description="How often buffered metrics go to MLflow.")
    metrics_buffer_limit: int = Field(1_000_000, ge=1000, description="Metric points kept while MLflow is unreachable.")
    log_model: bool = Field(True, description="Log the final model to MLflow at the end of a job.")
    mlflow_wait_at_end_s: float = Field(
        300.0, ge=0, description="How long a finished job waits for an unreachable MLflow to take its metrics."
    )

    # Operator views of a worker (see README, "Operating Descent").
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the worker's Prometheus /metrics (one port per worker); 0 = off."
    )
    worker_metrics_host: str = Field("0.0.0.0", description="Address the worker's /metrics listens on.")
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

    # Crash recovery.
    lease_s: float = Field(30.0, gt=0, description="A running job whose worker is silent this long is lost.")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often workers look for lost and stuck jobs.")
    unclaimed_requeue_s: float = Field(60.0, gt=0, description="A queued job nobody claimed this long is enqueued again.")
    checkpoint_min_interval_s: float = Field(
        5.0, ge=0, description="Take an offered checkpoint only if the last one is at least this old."
    )

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
