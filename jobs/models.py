"""SQLAlchemy tables: jobs and the log of their transitions."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Text, TypeDecorator, Uuid, false, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints, so that Alembic migrations can drop and rename them later.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on the way out, whatever the database keeps (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


DEFAULT_PROJECT = "default"
DEFAULT_POOL = "default"  # jobs/pool_names.py's, repeated: a migration's server default must not move


class Project(Base):
    """Who owns jobs: a key of one project never sees another project's objects."""

    __tablename__ = "projects"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # What the project may hold at once, where an admin set it; NULL: the server's setting
    # (MAX_ACTIVE_JOBS_PER_PROJECT, MAX_STUDY_PARALLELISM_PER_PROJECT). See jobs/limits.py.
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_study_parallelism: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    """An API key, kept as its SHA-256 only: the key itself is shown once, at creation.

    Three kinds: a plain key works in its project; an admin key (`admin`) also manages its
    own project's keys; a server-admin key (`server_admin`, always an admin key too) creates
    projects and manages every project's keys, and reads the server's /metrics."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("admin OR NOT server_admin", name="server_admin_is_admin"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # enough to tell keys apart in a listing
    label: Mapped[str | None] = mapped_column(String(200))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    server_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MlflowName(Base):
    """A name Descent made in MLflow for a project: an experiment (`<project>/<name>`) or a
    registered model (`<project>.<study>`). Descent writes only into names recorded here:
    any MLflow user may create any name, so one that exists in MLflow but not here was made
    by someone else (jobs/mlflow_tenancy.py moves it out of the project's way)."""

    __tablename__ = "mlflow_names"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)  # experiment | registered_model
    name: Mapped[str] = mapped_column(String(300), primary_key=True)  # as MLflow spells it
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name"), index=True)
    mlflow_id: Mapped[str] = mapped_column(String(300))  # an experiment's id; a registered model's name
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Study(Base):
    """A comparison: trial jobs sampled from a search space over a base spec (jobs/study_spec.py)."""

    __tablename__ = "studies"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    configs_created: Mapped[int] = mapped_column(Integer, default=0)  # configurations sampled so far
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))  # the parent of the trials' runs
    # The study ended but its MLflow report (leaderboard, plots, registered model) is not
    # written yet: MLflow was down, or the worker that ended it died. The reaper retries.
    report_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    result: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)  # the final leaderboard and report
    # The API key that submitted it (its trials carry it too); None: from before migration 0016.
    submitted_by_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("api_keys.id"))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project: Mapped[str] = mapped_column(
        String(64), ForeignKey("projects.name"), default=DEFAULT_PROJECT, server_default=DEFAULT_PROJECT
    )
    name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    epoch: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    latest_metrics: Mapped[dict[str, float]] = mapped_column(JSONDocument, default=dict)

    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    # A finished job whose MLflow run is still RUNNING (MLflow was down when the job
    # ended, or the job was cancelled while queued): the reaper ends the run later.
    mlflow_run_to_end: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    # spec.diagnostics' end-of-run summary (Hessian spectrum and verdict, per-class metrics, costs).
    diagnostics: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)

    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)

    # Crash recovery: the running attempt's worker renews its lease; the reaper
    # requeues a job whose lease ran out. enqueued_at finds queued jobs whose
    # message was lost.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The device pool (spec.resources.pool), a column so that a worker's claim filters on it
    # cheaply (ix_jobs_pool_status).
    pool: Mapped[str] = mapped_column(String(32), default=DEFAULT_POOL, server_default=DEFAULT_POOL)

    # A client's Idempotency-Key: a retried submission returns this job instead of a new one.
    # Unique per project: two projects may well pick the same key.
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    spec_sha256: Mapped[str | None] = mapped_column(String(64))

    # A study's trial: which configuration (a hash of its sampled values) and which
    # Optuna trial it is; the objective after each epoch; whether Optuna was told the end.
    study_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("studies.id"), index=True)
    config_id: Mapped[str | None] = mapped_column(String(16))
    trial_number: Mapped[int | None] = mapped_column(Integer)
    objective_curve: Mapped[list[list[float]]] = mapped_column(JSONDocument, default=list)
    trial_told: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The pack the trial trained in (issue 13): trials with the same pack_id were claimed
    # together and trained as one computation; None: it trained alone.
    pack_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    # When the running attempt's training ended (None: it has not, or a later attempt
    # started): a study's trial then no longer holds a place of its parallelism while it
    # writes its results to MLflow (jobs/studies.py, holds_a_place).
    trained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The API key that submitted it, or its study; None: from before migration 0016. Its
    # label names the person in the MLflow run (`mlflow.user`).
    submitted_by_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("api_keys.id"))

    # Keyset pagination walks (created_at, id) newest first.
    __table_args__ = (
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_project_created_at_id", "project", "created_at", "id"),
        Index("ix_jobs_pool_status", "pool", "status"),
        Index("uq_jobs_project_idempotency_key", "project", "idempotency_key", unique=True),
        # The job quota's count (jobs/limits.py, active_jobs) reads only a project's unfinished jobs (0013).
        Index(
            "ix_jobs_project_unfinished",
            "project",
            postgresql_where=text("status NOT IN ('succeeded', 'failed', 'cancelled', 'pruned')"),
            sqlite_where=text("status NOT IN ('succeeded', 'failed', 'cancelled', 'pruned')"),
        ),
        Index(
            "ix_jobs_mlflow_run_to_end",
            "mlflow_run_to_end",
            postgresql_where=text("mlflow_run_to_end"),
            sqlite_where=text("mlflow_run_to_end"),
        ),
    )


class JobEvent(Base):
    """One row per status transition: the job's history with timestamps."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)


class JobCheckpoint(Base):
    """The latest checkpoint of a job, where any worker on any machine can read it: in this row
    (`data`, up to CHECKPOINT_INLINE_MAX_BYTES), or in MLflow's artifact store (`object_uri`,
    with the size and SHA-256 it must read back with; jobs/artifact_store.py)."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (CheckConstraint("(data IS NULL) <> (object_uri IS NULL)", name="inline_or_stored"),)

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    data: Mapped[bytes | None] = mapped_column(LargeBinary)
    object_uri: Mapped[str | None] = mapped_column(String(500))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))


class Dataset(Base):
    """An uploaded dataset, normalised once at upload (an NPZ of float32 X, int64 y 0..C-1 and
    the class names) and kept in the database: workers on any machine read it from here and
    never parse CSV. Content-addressed: one row per (project, file's SHA-256, label column)."""

    __tablename__ = "datasets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project: Mapped[str] = mapped_column(String(64), ForeignKey("projects.name"))
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16))  # csv, parquet, npz
    label_column: Mapped[str] = mapped_column(String(200), default="", server_default="")  # "" for NPZ
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_rows: Mapped[int] = mapped_column(Integer)
    shape: Mapped[list[int]] = mapped_column(JSONDocument)  # one sample's: [F], [T, F] or [C, H, W]
    classes: Mapped[list[str]] = mapped_column(JSONDocument)
    feature_names: Mapped[list[str] | None] = mapped_column(JSONDocument)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The stored NPZ: in this row up to DATASET_INLINE_MAX_BYTES (deferred: listings never read
    # the arrays), else in MLflow's artifact store at `object_uri`, with the size and SHA-256
    # of the stored NPZ (`sha256` above is the uploaded file's).
    data: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    object_uri: Mapped[str | None] = mapped_column(String(500))
    object_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    object_sha256: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("(data IS NULL) <> (object_uri IS NULL)", name="inline_or_stored"),
        Index("uq_datasets_project_sha256_label_column", "project", "sha256", "label_column", unique=True),
        Index("ix_datasets_project_created_at", "project", "created_at"),
    )


class Worker(Base):
    """A worker as its heartbeats describe it (worker/heartbeat.py): the pool it serves, its
    devices, when it was last seen. Rows stay after the worker is gone: a pool that ever had
    a worker is a known pool (a job for it waits; one for a pool never seen is a 422)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # Celery's node name, `<name>@<host>`
    pool: Mapped[str] = mapped_column(String(32), index=True)
    devices: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument, default=list)  # [{kind, name, memory_mb}]
    concurrency: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a clean stop said so; a crash says nothing
