"""Request and response models of the v1 API (the job spec itself is jobs.spec.JobSpec)."""

from __future__ import annotations

import math
import sys
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import Row

from jobs.access import PROJECT_NAME, PROJECT_NAME_RULE
from jobs.models import ApiKey, Dataset, Job, Study
from jobs.spec import JobSpec, NulFreeStr
from jobs.states import JobStatus, StudyStatus
from jobs.study_spec import StudySpec
from jobs.tracking import run_url


class JobProgress(BaseModel):
    epoch: int
    step: int
    total_steps: int
    fraction: float


class JobMetrics(BaseModel):
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None


class JobMlflow(BaseModel):
    experiment_id: str | None
    run_id: str | None
    run_url: str | None


class JobError(BaseModel):
    type: str = Field(
        description="What failed: the exception's name (e.g. TrainingDiverged, TimeoutError), or "
        "dataset_unavailable: a standard image set the worker lacks and could not fetch."
    )
    message: str


class JobTrial(BaseModel):
    """Where a study's trial stands in its study."""

    study_id: uuid.UUID
    config_id: str | None
    trial_number: int | None
    pack_id: uuid.UUID | None = Field(
        None, description="The pack the trial trained in: trials with the same pack_id were trained together as one "
        "computation by one worker (search.pack_size); null: it trained alone.",
    )  # fmt: skip


class HessianSummary(BaseModel):
    """The training loss's Hessian at the end (trainer/hessian.py says how the verdict is decided)."""

    verdict: str = Field(description="local_minimum, saddle_point, not_critical or no_finite_minimum.")
    # None on jobs that ran before these were reported.
    verdict_reason: str | None = Field(None, description="What decided the verdict, with its numbers.")
    predicted_decrease_ratio: float | None = Field(
        None, description="gradient_norm^2 / (2 max_eig) / loss: the share of the loss a gradient step of 1/max_eig "
        "would remove; above gradient_tolerance the point is not critical.",
    )  # fmt: skip
    fits_every_sample: bool | None = Field(None, description="Every evaluated sample classified correctly.")
    # None where a value was not finite (JSON has no NaN).
    max_eig: float | None
    min_eig: float | None
    positive_fraction: float = Field(description="Positive eigenvalues among the top-k by magnitude.")
    top_eigenvalues: list[float | None] = Field(description="The top-k eigenvalues, by decreasing magnitude.")
    sharpness_ratio: float | None = Field(
        description="max_eig * lr / 2: above 1, plain gradient descent at lr is unstable."
    )
    gradient_norm: float | None
    loss: float | None
    lr: float
    samples: int = Field(description="Training samples the loss was evaluated on.")
    parameters: int
    hvp_count: int = Field(description="Hessian-vector products computed.")
    gradient_tolerance: float
    curvature_tolerance: float


class ClassMetrics(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class JobDiagnostics(BaseModel):
    """What spec.diagnostics asked for, at the end of training (the grids are in MLflow)."""

    hessian: HessianSummary | None = None
    per_class: dict[str, ClassMetrics] | None = Field(None, description="Validation metrics per class.")
    f1_macro: float | None = None
    costs_seconds: dict[str, float] = Field(default_factory=dict, description="Time each diagnostic took.")


class JobPublic(BaseModel):
    id: uuid.UUID
    project: str
    name: str
    status: JobStatus
    spec: JobSpec
    study: JobTrial | None = None
    created_at: datetime
    started_at: datetime | None
    trained_at: datetime | None = Field(
        None, description="When its training ended; it stays running while its results (model, figures, last "
        "metrics) are written to MLflow, and finishes once they are in.",
    )
    finished_at: datetime | None
    attempts: int
    progress: JobProgress
    metrics: JobMetrics
    mlflow: JobMlflow
    error: JobError | None
    diagnostics: JobDiagnostics | None = None
    waiting_reason: str | None = Field(
        None, description="Why a queued job cannot start: no live worker serves its device pool (README, \"Device pools\")."
    )

    @classmethod
    def from_row(cls, job: Job | Row[Any], waiting_reason: str | None = None) -> JobPublic:
        """From a job's ORM object, or from the plain row of its columns (repository.read_job_view)."""
        return cls(
            waiting_reason=waiting_reason if job.status == JobStatus.queued else None,
            id=job.id,
            project=job.project,
            name=job.name,
            status=JobStatus(job.status),
            spec=JobSpec.model_validate(job.spec),
            created_at=job.created_at,
            started_at=job.started_at,
            trained_at=job.trained_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            progress=JobProgress(
                epoch=job.epoch,
                step=job.step,
                total_steps=job.total_steps,
                fraction=round(min(1.0, job.step / job.total_steps), 4) if job.total_steps else 0.0,
            ),
            metrics=JobMetrics(
                **{k: finite_or_none(v) for k, v in (job.latest_metrics or {}).items() if k in JobMetrics.model_fields}
            ),
            mlflow=JobMlflow(
                experiment_id=job.mlflow_experiment_id,
                run_id=job.mlflow_run_id,
                run_url=run_url(job.mlflow_experiment_id, job.mlflow_run_id),
            ),
            error=JobError(type=job.error_type, message=job.error_message or "") if job.error_type else None,
            study=JobTrial(study_id=job.study_id, config_id=job.config_id, trial_number=job.trial_number,
                           pack_id=job.pack_id)
            if job.study_id
            else None,
            diagnostics=JobDiagnostics.model_validate(job.diagnostics) if job.diagnostics else None,
        )


class JobsPublic(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class MetricPoint(BaseModel):
    step: int
    value: float | None  # None where the value was NaN or infinite (JSON has no such numbers)


def finite_or_none(value: float | None) -> float | None:
    # MLflow's SQL stores keep +-inf as +-sys.float_info.max: that is infinite too.
    if value is None or not math.isfinite(value) or abs(value) >= sys.float_info.max:
        return None
    return value


class Problem(BaseModel):
    detail: str


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No API key, or one that is unknown or revoked."},
    429: {"model": Problem, "description": "Too many requests with an invalid key from this address (Retry-After)."},
}
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    403: {"model": Problem, "description": "The API key does not administer this (not an admin key, an admin "
          "key of another project, or a project admin where a server admin is needed)."},
}

# Every route that reads a body: unreadable JSON, and bodies over MAX_REQUEST_BYTES.
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body could not be read as JSON."},
    413: {"model": Problem, "description": "The body is larger than MAX_REQUEST_BYTES."},
}


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=PROJECT_NAME.pattern, max_length=64, description=PROJECT_NAME_RULE)


class ProjectPublic(BaseModel):
    name: str
    created_at: datetime


class MlflowLoginPublic(BaseModel):
    username: str
    password: str = Field(
        description="Shown this once: MLflow keeps only its hash (a new one: python -m api.admin mlflow-login)."
    )


class ProjectCreated(ProjectPublic):
    mlflow_login: MlflowLoginPublic | None = Field(
        None, description="The project's MLflow user, which reads only the project's experiments and models; "
        "null where MLflow runs without its auth app.",
    )


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    admin: bool = Field(False, description="An admin key also manages its project's keys.")
    server_admin: bool = Field(
        False, description="A server-admin key creates projects and manages every project's keys; "
        "only a server-admin key may make one."
    )
    label: NulFreeStr | None = Field(None, max_length=200, description="What the key is for, shown in listings.")


class KeyPublic(BaseModel):
    """A key as listings show it: never the key itself."""

    id: uuid.UUID
    project: str
    prefix: str
    label: str | None
    admin: bool
    server_admin: bool
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return cls(id=row.id, project=row.project, prefix=row.prefix, label=row.label, admin=row.admin,
                   server_admin=row.server_admin, created_at=row.created_at, revoked_at=row.revoked_at)  # fmt: skip


class KeyCreated(KeyPublic):
    key: str = Field(description="The API key. Shown this once: only its hash is kept.")


class Readiness(BaseModel):
    database: str
    broker: str


Catalog = dict[str, Any]


class StudyPack(BaseModel):
    """Trials one worker trained together as one computation (issue 13)."""

    pack_id: uuid.UUID
    job_ids: list[uuid.UUID]


class StudyPublic(BaseModel):
    """A study as people read it: where it stands, and the leaderboard so far."""

    id: uuid.UUID
    project: str
    name: str
    status: StudyStatus
    spec: StudySpec
    created_at: datetime
    finished_at: datetime | None
    configurations: int = Field(description="Configurations the study runs (each once per seed).")
    configurations_started: int
    trials: dict[str, int] = Field(description="Trial jobs by status.")
    leaderboard: dict[str, Any] = Field(description="Per configuration: mean and std of the objective over seeds, "
                                                    "steps to target; best vs runner-up: Welch t-test, bootstrap CI.")  # fmt: skip
    lr_range_test: dict[str, Any] | None = None
    invalid_configurations: list[dict[str, Any]] = []
    registered_model: dict[str, Any] | None = None
    packs: list[StudyPack] = Field([], description="The trials that trained packed, pack by pack; a trial in none "
                                                   "trained alone.")  # fmt: skip
    mlflow: JobMlflow

    @classmethod
    def from_row(
        cls, study: Study, trials: dict[str, int], leaderboard: dict[str, Any], packs: list[dict[str, Any]] | None = None
    ) -> StudyPublic:
        spec = StudySpec.model_validate(study.spec)
        result = study.result or {}
        return cls(
            id=study.id, project=study.project, name=study.name, status=StudyStatus(study.status), spec=spec,
            created_at=study.created_at, finished_at=study.finished_at, configurations=spec.n_configurations,
            configurations_started=study.configs_created, trials=trials, leaderboard=_json_safe(leaderboard),
            lr_range_test=_json_safe(result.get("lr_range_test")),
            invalid_configurations=result.get("invalid_configurations", []),
            registered_model=result.get("registered_model"), packs=packs or [],
            mlflow=JobMlflow(experiment_id=study.mlflow_experiment_id, run_id=study.mlflow_run_id,
                             run_url=run_url(study.mlflow_experiment_id, study.mlflow_run_id, tab="")),
        )  # fmt: skip


class StudiesPublic(BaseModel):
    items: list[StudyPublic]


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a diverged trial) become null: JSON has no such numbers."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class DatasetPublic(BaseModel):
    """An uploaded dataset as the API shows it (never its data)."""

    id: uuid.UUID
    project: str
    name: str
    format: str = Field(description="csv, parquet or npz.")
    label: str | None = Field(description="The label column (CSV, Parquet); null for NPZ.")
    sha256: str = Field(description="SHA-256 of the uploaded file.")
    size_bytes: int
    n_rows: int
    n_features: int = Field(description="Values per sample (the product of shape).")
    n_classes: int
    classes: list[str] = Field(description="Class names in label order: label i is classes[i].")
    shape: list[int] = Field(description="One sample's shape: [F] tabular, [T, F] sequence, [C, H, W] image.")
    feature_names: list[str] | None = Field(description="The feature columns (CSV, Parquet).")
    created_at: datetime

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        return cls(
            id=row.id, project=row.project, name=row.name, format=row.format, label=row.label_column or None,
            sha256=row.sha256, size_bytes=row.size_bytes, n_rows=row.n_rows, n_features=math.prod(row.shape),
            n_classes=len(row.classes), classes=row.classes, shape=row.shape, feature_names=row.feature_names,
            created_at=row.created_at,
        )  # fmt: skip


class DatasetsPublic(BaseModel):
    items: list[DatasetPublic]


# --------------------------------------------------------------------------- quotas (jobs/limits.py)


class QuotaProblem(Problem):
    limit: str = Field(description="The limit the project is at: max_active_jobs or max_study_parallelism.")


QUOTA_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {
        "model": QuotaProblem,
        "description": "The project holds as much as it may at once; the Retry-After header says when to ask again.",
    }
}


def _integral(value: Any) -> Any:
    """1241.0 is an integer to JSON Schema (and to the clients that write it so): taken as 1241."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Strict otherwise: "5" or true is a 422, not silently 5 or 1.
Limit = Annotated[int, Field(ge=1, le=1_000_000), BeforeValidator(_integral)]


class ProjectLimitsUpdate(BaseModel):
    """A project's own limits; null puts the server's setting back."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_active_jobs: Limit | None = Field(
        None, description="Jobs queued or running at once (null: MAX_ACTIVE_JOBS_PER_PROJECT)."
    )
    max_study_parallelism: Limit | None = Field(
        None,
        description="Sum of its running studies' parallelism (null: MAX_STUDY_PARALLELISM_PER_PROJECT).",
    )  # fmt: skip


class ProjectLimitsPublic(BaseModel):
    """What the project may hold at once, what it holds now, and where each limit comes from."""

    project: str
    max_active_jobs: int
    max_study_parallelism: int
    source: dict[str, Literal["project", "server"]] = Field(
        description="Per limit: set for this project by an admin, or the server's setting."
    )
    active_jobs: int = Field(description="Jobs queued or running now.")
    study_parallelism: int = Field(description="Sum of the parallelism of its running studies now.")
