"""What this server agrees to run, and how much of it one project may hold.

Two kinds of limit, both checked where a job row is created (`repository.create_job`,
the one gate every job goes through: a submitted job, a study's trial, a sampled
configuration):
- what one job may ask for (settings `MAX_*`): over one, the job cannot be afforded
  at all, a 422 naming the field and the limit;
- what one project may hold at once (queued and running jobs, its running studies'
  parallelism; settings, overridden per project by an admin): over one, a 429 with
  Retry-After: the same request succeeds once the project's work has moved on.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Row, bindparam, func, literal_column, select
from sqlalchemy.orm import Session

from jobs.access import UnknownProject
from jobs.models import Job, Project, Study
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.states import TERMINAL, StudyStatus
from jobs.study_spec import StudySpec

# Hessian-vector products one spectrum takes, nominally: trainer/hessian.py runs ARPACK's
# Lanczos with a basis of 40 vectors (2 top_k + 1 when larger), about two restarts, and
# one more short run for each end of the spectrum when the top ones share a sign.
LANCZOS_BASIS = 40
LANCZOS_RUNS = 4

# When a project over a quota should ask again: jobs take seconds to hours, so this is
# a polite pace for a retry loop, not a promise.
QUOTA_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class LimitBreach:
    field: str
    message: str


class LimitExceeded(ValueError):
    """The job asks for more than this server runs (a 422)."""

    def __init__(self, breaches: list[LimitBreach]) -> None:
        super().__init__("; ".join(f"{b.field}: {b.message}" for b in breaches))
        self.breaches = breaches


class QuotaExceeded(RuntimeError):
    """The project holds as much as it may at once (a 429)."""

    def __init__(self, setting: str, message: str, retry_after_s: int = QUOTA_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.setting = setting
        self.retry_after_s = retry_after_s


def diagnostics_cost(spec: JobSpec, parameters: int) -> float:
    """The estimated cost of the job's Hessian and landscape diagnostics, in sample-parameter
    products (see MAX_DIAGNOSTICS_COST)."""
    diagnostics = spec.diagnostics
    cost = 0.0
    if (hessian := diagnostics.hessian) is not None:
        spectra = 1 + (spec.epochs // hessian.every_epochs if hessian.every_epochs else 0)
        products = LANCZOS_RUNS * max(2 * hessian.top_k + 1, LANCZOS_BASIS)
        samples = min(hessian.max_samples, spec.split_sizes[0])
        cost += spectra * products * 2 * samples * parameters
    if (landscape := diagnostics.landscape) is not None:
        points = (landscape.resolution if landscape.kind in ("1d", "both") else 0) + (
            landscape.resolution**2 if landscape.kind in ("2d", "both") else 0
        )
        cost += points * min(landscape.max_samples, spec.split_sizes[0]) * parameters
    return cost


def limit_breaches(spec: JobSpec, limits: Settings) -> list[LimitBreach]:
    breaches = []

    def check(field: str, value: float, limit: float, what: str, setting: str) -> None:
        if value > limit:
            breaches.append(
                LimitBreach(field, f"{what} ({value:,.0f}) is over this server's limit of {limit:,.0f} ({setting})")
            )

    dataset = spec.dataset
    check("epochs", spec.epochs, limits.max_epochs, "epochs", "MAX_EPOCHS")
    check("epochs", spec.total_steps, limits.max_total_steps, "the run's total steps", "MAX_TOTAL_STEPS")
    check("dataset", dataset.n_samples, limits.max_dataset_samples, "the dataset's samples", "MAX_DATASET_SAMPLES")
    values = dataset.n_samples * dataset.n_features
    check("dataset", values, limits.max_dataset_values, "the dataset's values (samples x features)", "MAX_DATASET_VALUES")
    parameters = spec.model.n_parameters(spec.input_shape, dataset.n_classes)
    check("model", parameters, limits.max_model_parameters, "the model's parameters", "MAX_MODEL_PARAMETERS")
    if spec.diagnostics.hessian is not None:
        check("diagnostics.hessian", parameters, limits.max_hessian_parameters,
              "the model's parameters, for a Hessian diagnostic", "MAX_HESSIAN_PARAMETERS")  # fmt: skip
    if spec.diagnostics.hessian is not None or spec.diagnostics.landscape is not None:
        check("diagnostics", diagnostics_cost(spec, parameters), limits.max_diagnostics_cost,
              "the Hessian and landscape's estimated cost (sample-parameter products)",
              "MAX_DIAGNOSTICS_COST")  # fmt: skip
    return breaches


def with_default_timeout(spec: JobSpec, limits: Settings) -> JobSpec:
    """A job that states no timeout gets the server's (DEFAULT_TIMEOUT_S), written into its spec."""
    if spec.timeout_s is not None or not limits.default_timeout_s:
        return spec
    return spec.model_copy(update={"timeout_s": limits.default_timeout_s})


# --------------------------------------------------------------------------- per-project quotas


@dataclass(frozen=True)
class ProjectLimits:
    """What one project may hold at once: its own values where an admin set them, else the server's."""

    max_active_jobs: int
    max_study_parallelism: int
    active_jobs_overridden: bool = False
    study_parallelism_overridden: bool = False


# Built once: the job gate runs these on every submission, and building a statement (and
# its cache key) each time cost more than running it. Executed on the session's Connection
# (the ORM's execution path adds nothing a plain row needs), after the session's pending
# changes are flushed, as the ORM's autoflush would.
PROJECT_LIMITS = select(Project.max_active_jobs, Project.max_study_parallelism).where(
    Project.name == bindparam("project")
)
PROJECT_LIMITS_LOCKED = PROJECT_LIMITS.with_for_update(key_share=True)
# The statuses as literals, as the partial index of unfinished jobs states them (migration
# 0013): the planner sees the index fits whatever the plan, and no list is bound each time.
_ACTIVE_JOBS = select(func.count()).select_from(Job).where(
    Job.project == bindparam("project"), Job.status.not_in([literal_column(f"'{s.value}'") for s in sorted(TERMINAL)])
)


def project_limits(*, session: Session, project: str, limits: Settings, lock: bool = False) -> ProjectLimits:
    """The project's limits. With `lock`, its row stays locked until the transaction ends:
    concurrent submissions of one project are counted one after the other, so that two
    cannot both take the last place.

    The lock is FOR NO KEY UPDATE: it excludes the others like it, but not the KEY SHARE
    lock that inserting a job (its foreign key to the project) takes, so a transaction may
    insert its job and lock the project in either order, or in one statement (as the job gate
    does on PostgreSQL, jobs/repository.create_job), without deadlocking against another."""
    statement = PROJECT_LIMITS_LOCKED if lock else PROJECT_LIMITS
    session.flush()
    return limits_of_row(session.connection().execute(statement, {"project": project}).first(), limits)


def limits_of_row(row: Row | None, limits: Settings) -> ProjectLimits:
    """The ProjectLimits of a PROJECT_LIMITS row (None: the project has no row; the server's settings)."""
    active, parallelism = row if row is not None else (None, None)
    return ProjectLimits(
        max_active_jobs=active if active is not None else limits.max_active_jobs_per_project,
        max_study_parallelism=parallelism if parallelism is not None else limits.max_study_parallelism_per_project,
        active_jobs_overridden=active is not None,
        study_parallelism_overridden=parallelism is not None,
    )


def _where_set(project: str, overridden: bool, setting: str) -> str:
    return f"set for this project by an admin (PUT /v1/projects/{project}/limits)" if overridden else setting


def active_jobs(*, session: Session, project: str) -> int:
    session.flush()
    return session.connection().execute(_ACTIVE_JOBS, {"project": project}).scalar() or 0


def room_for_jobs(*, session: Session, project: str, limits: Settings) -> int:
    """How many more jobs the project may have queued or running now. Locks the project's
    row until the transaction ends (see project_limits)."""
    own = project_limits(session=session, project=project, limits=limits, lock=True)
    return max(0, own.max_active_jobs - active_jobs(session=session, project=project))


def check_room_for_job(
    *, session: Session, project: str, limits: Settings, added: int = 0, locked: ProjectLimits | None = None
) -> None:
    """QuotaExceeded when the project already has as many jobs queued or running as it may
    (`added`: jobs this transaction has inserted already, which the count sees).
    Locks the project's row until the transaction ends (see project_limits), unless the
    caller locked it already and passes what it read (`locked`); the count is read after
    the lock is held, so it sees every job committed by whoever held it before."""
    own = locked or project_limits(session=session, project=project, limits=limits, lock=True)
    held = active_jobs(session=session, project=project) - added
    if held >= own.max_active_jobs:
        where = _where_set(project, own.active_jobs_overridden, "MAX_ACTIVE_JOBS_PER_PROJECT")
        raise QuotaExceeded(
            "max_active_jobs",
            f"project {project!r} has {held:,} jobs queued or running, its limit of {own.max_active_jobs:,} "
            f"({where}); submit again once some have ended",
        )


def study_parallelism(spec: StudySpec | dict) -> int:
    """Trial jobs a study keeps queued or running at most (a configuration's seeds together)."""
    study = spec if isinstance(spec, StudySpec) else StudySpec.model_validate(spec)
    parallelism = getattr(study.search, "parallelism", None)
    if parallelism is None:  # the range test: one job
        return 1
    return min(max(parallelism, study.repeats), study.n_jobs)


def running_study_parallelism(*, session: Session, project: str) -> int:
    running = session.scalars(select(Study.spec).where(Study.project == project, Study.status == StudyStatus.running))
    return sum(study_parallelism(spec) for spec in running)


def check_room_for_study(*, session: Session, project: str, parallelism: int, seeds: int, limits: Settings) -> None:
    """QuotaExceeded when the project's running studies and this one would together keep
    more trials going at once than the project may, or when one configuration's seeds
    (started together) are more jobs than the project may hold. Locks the project's row."""
    own = project_limits(session=session, project=project, limits=limits, lock=True)
    if seeds > own.max_active_jobs:
        where = _where_set(project, own.active_jobs_overridden, "MAX_ACTIVE_JOBS_PER_PROJECT")
        raise QuotaExceeded(
            "max_active_jobs",
            f"the study runs each configuration over {seeds} seeds at once, more than project {project!r} "
            f"may hold ({own.max_active_jobs:,}, {where}); lower repeats",
        )
    held = running_study_parallelism(session=session, project=project)
    if held + parallelism > own.max_study_parallelism:
        where = _where_set(project, own.study_parallelism_overridden, "MAX_STUDY_PARALLELISM_PER_PROJECT")
        raise QuotaExceeded(
            "max_study_parallelism",
            f"project {project!r} runs studies with a parallelism of {held:,} in all; this one's "
            f"{parallelism:,} would take it over its limit of {own.max_study_parallelism:,} ({where}); "
            "lower search.parallelism or submit again once a study has ended",
        )


def set_project_limits(
    *, session: Session, project: str, max_active_jobs: int | None, max_study_parallelism: int | None
) -> None:
    """The project's own limits (None: the server's setting again). Work already admitted
    keeps running; only what is created from now on is held to them."""
    row = session.get(Project, project, with_for_update={"key_share": True})  # as project_limits locks it
    if row is None:
        raise UnknownProject(f"project {project!r} does not exist")
    row.max_active_jobs, row.max_study_parallelism = max_active_jobs, max_study_parallelism
    session.flush()


@dataclass(frozen=True)
class ProjectUsage:
    limits: ProjectLimits
    active_jobs: int
    study_parallelism: int


def project_usage(*, session: Session, project: str, limits: Settings) -> ProjectUsage | None:
    """The project's limits and what it holds now; None when there is no such project."""
    if session.get(Project, project) is None:
        return None
    return ProjectUsage(
        limits=project_limits(session=session, project=project, limits=limits),
        active_jobs=active_jobs(session=session, project=project),
        study_parallelism=running_study_parallelism(session=session, project=project),
    )
