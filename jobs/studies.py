"""Every read and write of studies, and the step that moves a study on.

`advance_study` is the one place a study changes: it tells Optuna how trials went
(once they have trained or ended), creates the next trial jobs while the study has room
(`search.parallelism`, `holds_a_place`) and budget (its configurations), and ends the
study once every trial has ended. It runs when the study is created (API), whenever
trials of it have trained or ended (the worker that ran them), and on every reaper pass
(a worker that died between the two), under a lock on the study's row, so that
concurrent callers never create a trial twice.
Torch-free.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import study_search
from jobs.db import session_scope
from jobs.events import stage_to, study_stream_key
from jobs.leaderboard import TrialRecord, build_leaderboard
from jobs.models import Job, Study, utcnow
from jobs.pool_names import DEFAULT_POOL
from jobs.queue import enqueue_job
from jobs.limits import check_room_for_study, room_for_jobs, study_parallelism
from jobs.repository import create_job, request_cancel
from jobs.settings import settings
from jobs.spec import JobSpec
from jobs.states import STUDY_TERMINAL, TERMINAL, JobStatus, StudyStatus
from jobs.study_spec import GridDimension, LRRangeTest, StudySpec, config_id, describe_values, sampled_spec

log = logging.getLogger(__name__)


def parse_study(study: Study) -> StudySpec:
    return StudySpec.model_validate(study.spec)


def range_test_spec(spec: StudySpec, seed: int) -> JobSpec:
    """The range test's one job: the base spec with the exponential ramp from min_lr to
    max_lr over (at least) `steps` steps, every step logged."""
    search = spec.search
    assert isinstance(search, LRRangeTest)
    base = sampled_spec(spec, {}, seed)
    epochs = max(1, math.ceil(search.steps / base.steps_per_epoch))
    optimizer = base.optimizer.model_dump(mode="json") | {"lr": search.max_lr}
    schedule = {"name": "lr_range", "min_lr": search.min_lr, "stop_factor": search.stop_factor}
    raw = base.model_dump(mode="json") | {"optimizer": optimizer, "schedule": schedule, "epochs": epochs,
                                          "log_every_steps": 1}  # fmt: skip
    return JobSpec.model_validate(raw)


def trial_spec(spec: StudySpec, values: dict[str, Any], seed: int, number: int) -> JobSpec:
    job_spec = range_test_spec(spec, seed) if isinstance(spec.search, LRRangeTest) else sampled_spec(spec, values, seed)
    name = f"{spec.name}-{number}-seed{seed}"[:100]
    return job_spec.model_copy(update={"name": name})


def _stage_state(session: Session, study: Study, detail: str | None = None) -> None:
    data = {"status": study.status, "detail": detail, "at": utcnow(), "final": study.status in STUDY_TERMINAL}
    stage_to(session, study_stream_key(study.id), "state", data, final=study.status in STUDY_TERMINAL)


def create_study(
    *, session: Session, spec: StudySpec, project: str, submitted_by_key_id: uuid.UUID | None = None
) -> tuple[Study, list[uuid.UUID]]:
    """The study and its first trial jobs (ids to enqueue once committed); QuotaExceeded
    when the project's running studies leave no room for this one's parallelism. At most
    STUDY_TRIALS_PER_ADVANCE trials are created now (an Optuna ask each), so that a study
    of any size is created at once: the caller moves it on once it has answered, and the
    study goes on as its trials end and at each reaper pass."""
    seeds = 1 if isinstance(spec.search, LRRangeTest) else len(spec.seeds)
    check_room_for_study(session=session, project=project, parallelism=study_parallelism(spec), seeds=seeds,
                         limits=settings)  # fmt: skip
    study = Study(project=project, name=spec.name, status=StudyStatus.running,
                  spec=spec.model_dump(mode="json", by_alias=True), configs_created=0, result={},
                  submitted_by_key_id=submitted_by_key_id)  # fmt: skip
    session.add(study)
    session.flush()
    study_search.load(study.id, spec, seed=spec.seeds[0], create=True)
    _stage_state(session, study, "created")
    return study, advance_study(session=session, study_id=study.id, budget=settings.study_trials_per_advance).new_jobs


def get_study(*, session: Session, study_id: uuid.UUID, project: str | None = None) -> Study | None:
    study = session.get(Study, study_id, populate_existing=True)
    if study is None or (project is not None and study.project != project):
        return None
    return study


def list_studies(*, session: Session, project: str, limit: int = 50) -> list[Study]:
    query = select(Study).where(Study.project == project).order_by(Study.created_at.desc(), Study.id.desc())
    return list(session.scalars(query.limit(limit)))


def trial_jobs(*, session: Session, study_id: uuid.UUID) -> list[Job]:
    return list(session.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.created_at, Job.id)))


def _value_at(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _as_given(spec: StudySpec, path: str, value: Any) -> Any:
    """The value as the space wrote it: for a grid of objects, the grid's own object (the
    job's spec holds it with every default filled in, too long for a leaderboard)."""
    dim = spec.space[path]
    if isinstance(dim, GridDimension) and isinstance(value, dict):
        for choice in dim.grid:
            if isinstance(choice, dict) and all(value.get(k) == v for k, v in choice.items()):
                return choice
    return value


def trial_records(spec: StudySpec, jobs: list[Job]) -> list[TrialRecord]:
    metric = spec.objective.metric
    return [
        TrialRecord(
            job_id=str(job.id),
            config_id=job.config_id or "",
            values={path: _as_given(spec, path, _value_at(job.spec, path)) for path in spec.space},
            seed=int(job.spec.get("seed", 0)),
            status=job.status,
            objective=(job.latest_metrics or {}).get(metric) if job.status == JobStatus.succeeded else None,
            curve=list(job.objective_curve or []),
        )
        for job in jobs
    ]


def leaderboard(*, session: Session, study: Study) -> dict[str, Any]:
    return standing(session=session, study=study)[1]


def standing(*, session: Session, study: Study) -> tuple[dict[str, int], dict[str, Any]]:
    """(trial jobs by status, the leaderboard so far)."""
    spec = parse_study(study)
    jobs = trial_jobs(session=session, study_id=study.id)
    return counts_by_status(jobs), build_leaderboard(spec, trial_records(spec, jobs))


def packs(*, session: Session, study_id: uuid.UUID) -> list[dict[str, Any]]:
    """Which of the study's trials trained packed: [{pack_id, job_ids}], in the order the packs
    were claimed. A trial in none of them trained alone."""
    rows = session.execute(
        select(Job.pack_id, Job.id).where(Job.study_id == study_id, Job.pack_id.is_not(None))
        .order_by(Job.created_at, Job.id)
    ).all()  # fmt: skip
    by_pack: dict[uuid.UUID, list[str]] = {}
    for pack_id, job_id in rows:
        by_pack.setdefault(pack_id, []).append(str(job_id))
    return [{"pack_id": str(pack_id), "job_ids": job_ids} for pack_id, job_ids in by_pack.items()]


def counts_by_status(jobs: list[Job]) -> dict[str, int]:
    counts = {str(s): 0 for s in JobStatus}
    for job in jobs:
        counts[job.status] += 1
    return counts


def queue_width(spec: StudySpec) -> int:
    """Trial jobs the study keeps queued or running at once: `search.parallelism`, packed or
    not. Packs form among those trials (a worker claims the queued ones that pack with its
    own), so a study packs up to min(parallelism, pack_size) trials at a time; `parallelism`
    keeps meaning trials at once, which is what the project's limits and the sampler's
    pace (how many configurations it proposes before it hears of results) count."""
    return getattr(spec.search, "parallelism", 1)  # the range test: its one job


def has_trained(job: Job) -> bool:
    """A trial still running whose training is over (trained_at): its result is known (its
    latest metrics) and it is writing its results (model, figures, last metrics) to MLflow,
    work of the MLflow server more than of its worker's device."""
    return job.status not in TERMINAL and job.status != JobStatus.queued and job.trained_at is not None


def holds_a_place(job: Job) -> bool:
    """Whether a trial counts against its study's parallelism: queued, or running and not yet
    trained. One that has trained gives its place back and Optuna hears its result then:
    the next trials start (sampled knowing it) while it uploads, instead of each round of a
    study waiting on the last one's uploads. It keeps its worker slot and its place in its
    project's job quota until it ends."""
    return job.status not in TERMINAL and not has_trained(job)


@dataclass
class Advance:
    new_jobs: list[uuid.UUID] = field(default_factory=list)  # to enqueue once committed
    pool: str = DEFAULT_POOL  # the trials' device pool: whose queue they go to
    ended: bool = False  # the study ended in this step: its MLflow report is due


def lock_study(session: Session, study_id: uuid.UUID) -> Study | None:
    # A write first: the row lock on PostgreSQL, the database's write lock on SQLite.
    session.execute(
        update(Study).where(Study.id == study_id).values(configs_created=Study.configs_created)
        .execution_options(synchronize_session=False)
    )  # fmt: skip
    return session.get(Study, study_id, populate_existing=True)


def advance_study(*, session: Session, study_id: uuid.UUID, budget: int | None = None) -> Advance:
    """Tell, ask, create, end: see the module's docstring. The caller commits, then enqueues.

    At most `budget` trial jobs are created (each an Optuna ask, ~20 ms), whole
    configurations only; by default STUDY_TRIALS_PER_ADVANCE, or one configuration's
    seeds when they are more, so that every advance can make progress."""
    advance = Advance()
    study = lock_study(session, study_id)
    if study is None or study.status in STUDY_TERMINAL:
        return advance
    spec = parse_study(study)
    advance.pool = spec.pool
    jobs = trial_jobs(session=session, study_id=study.id)
    untold = [j for j in jobs
              if (j.status in TERMINAL or has_trained(j)) and not j.trial_told and j.trial_number is not None]
    active = sum(job.status not in TERMINAL for job in jobs)
    seeds = spec.seeds[:1] if isinstance(spec.search, LRRangeTest) else spec.seeds
    room = queue_width(spec) - sum(holds_a_place(job) for job in jobs)
    if budget is None:
        budget = max(settings.study_trials_per_advance, len(seeds))
    # A configuration's seeds are created together, within what the project may still hold
    # (MAX_ACTIVE_JOBS_PER_PROJECT): a study over its project's quota waits, it does not fail.
    project_room = 0
    if room > 0 and study.configs_created < spec.n_configurations:
        project_room = room_for_jobs(session=session, project=study.project, limits=settings)

    def can_create() -> bool:
        fits = budget >= len(seeds) and project_room >= len(seeds)
        return room > 0 and fits and study.configs_created < spec.n_configurations

    if untold or can_create():
        # Optuna only when there is something to tell or to ask (the reaper calls this
        # for every running study on every pass). A sampler is built for each advance:
        # seeded anew each time (by how far the study has come), or a random sampler
        # would propose the same first point at every advance.
        optuna_study = study_search.load(study.id, spec, seed=spec.seeds[0] * 100_003 + study.configs_created)
    metric = spec.objective.metric
    for job in untold:
        has_result = job.status == JobStatus.succeeded or has_trained(job)
        value = (job.latest_metrics or {}).get(metric) if has_result else None
        study_search.tell(optuna_study, job.trial_number, value, pruned=job.status == JobStatus.pruned)
        job.trial_told = True
    result = dict(study.result or {})
    while can_create():
        (planned,) = study_search.next_configurations(spec, study.configs_created, 1)
        number, values = study_search.ask(optuna_study, spec, planned)
        study.configs_created += 1
        numbers = [number] + [study_search.ask(optuna_study, spec, values)[0] for _ in seeds[1:]]
        budget -= len(seeds)  # asked, whether or not it becomes jobs
        try:
            specs = [trial_spec(spec, values, seed, study.configs_created) for seed in seeds]
            # The job gate (repository.create_job) holds every trial to the job limits; the
            # seeds of one configuration share them, so the first one refused is the first seed.
            # A trial is submitted by its study's key: its run names the same person.
            created = [create_job(session=session, spec=job_spec, project=study.project,
                                  submitted_by_key_id=study.submitted_by_key_id)[0] for job_spec in specs]  # fmt: skip
        except (ValidationError, ValueError) as exc:  # a sampled point the checks at creation did not catch
            for n in numbers:
                study_search.tell(optuna_study, n, None, pruned=False)
            message = str(exc) if isinstance(exc, ValidationError) else str(exc).splitlines()[0]
            result.setdefault("invalid_configurations", []).append(
                {"values": values, "error": f"{describe_values(values)}: {message}"[:1000]}
            )
            continue
        cid = config_id(values)
        for job, n in zip(created, numbers):
            job.study_id, job.config_id, job.trial_number = study.id, cid, n
            advance.new_jobs.append(job.id)
        room -= len(seeds)
        project_room -= len(seeds)
    study.result = result
    if not advance.new_jobs and active == 0 and study.configs_created >= spec.n_configurations:
        finished = [job for job in jobs if job.status == JobStatus.succeeded]
        _end(session, study, StudyStatus.succeeded if finished else StudyStatus.failed)
        advance.ended = True
    session.flush()
    return advance


def enqueue_trials(study_id: uuid.UUID, job_ids: list[uuid.UUID], pool: str = DEFAULT_POOL) -> None:
    """Send the messages of committed trial jobs to their pool's queue. The broker down:
    they stay queued in PostgreSQL and the reaper sends them."""
    for job_id in job_ids:
        try:
            enqueue_job(job_id, pool)
        except Exception as exc:  # noqa: BLE001 - still queued: the reaper sends it
            log.warning("trial %s of study %s not yet enqueued (%s); the reaper will send it", job_id, study_id, exc)
            break


def move_on(study_id: uuid.UUID) -> Advance:
    """advance_study in a transaction of its own, then its new trials enqueued (committed first:
    a worker never sees an id the database lacks)."""
    with session_scope() as session:
        step = advance_study(session=session, study_id=study_id)
    enqueue_trials(study_id, step.new_jobs, step.pool)
    return step


def _end(session: Session, study: Study, status: StudyStatus, detail: str | None = None) -> None:
    study.status = status
    study.finished_at = utcnow()
    study.report_pending = True
    study.result = dict(study.result or {}) | {"leaderboard": leaderboard(session=session, study=study)}
    _stage_state(session, study, detail)


@dataclass(frozen=True)
class StudyCancel:
    accepted: bool
    status: StudyStatus


def cancel_study(*, session: Session, study_id: uuid.UUID, project: str | None = None) -> StudyCancel | None:
    """Cancel the study and every trial still queued or running; None when it does not exist."""
    study = get_study(session=session, study_id=study_id, project=project)
    if study is None:
        return None
    study = lock_study(session, study_id)
    assert study is not None
    if study.status in STUDY_TERMINAL:
        return StudyCancel(accepted=False, status=StudyStatus(study.status))
    for job in trial_jobs(session=session, study_id=study_id):
        if job.status not in TERMINAL:
            request_cancel(session=session, job_id=job.id)
    _end(session, study, StudyStatus.cancelled, "cancel requested")
    return StudyCancel(accepted=True, status=StudyStatus.cancelled)


def running_study_ids(*, session: Session) -> list[uuid.UUID]:
    return list(session.scalars(select(Study.id).where(Study.status == StudyStatus.running)))


def studies_to_report(*, session: Session, limit: int = 10) -> list[uuid.UUID]:
    return list(session.scalars(select(Study.id).where(Study.report_pending.is_(True)).limit(limit)))


def set_parent_run(*, session: Session, study_id: uuid.UUID, experiment_id: str, run_id: str) -> None:
    session.execute(
        update(Study).where(Study.id == study_id)
        .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id).execution_options(synchronize_session=False)
    )  # fmt: skip


def claim_report(*, session: Session, study_id: uuid.UUID) -> Study | None:
    """The study if its report is due, locked until the session ends; None when it is not
    due or another process holds it (that one is writing it)."""
    query = (
        select(Study).where(Study.id == study_id, Study.report_pending.is_(True))
        .with_for_update(skip_locked=True).execution_options(populate_existing=True)
    )  # fmt: skip
    return session.scalars(query).first()


def record_report(*, session: Session, study_id: uuid.UUID, report: dict[str, Any]) -> None:
    study = session.get(Study, study_id, populate_existing=True)
    if study is None:
        return
    study.result = dict(study.result or {}) | report
    study.report_pending = False


def curve_point(job_step: int, total_steps: int, value: float) -> list[float]:
    """One row of a trial's objective curve: [step, percent of its schedule, value]."""
    return [job_step, round(100.0 * job_step / total_steps, 4) if total_steps else 100.0, value]
