"""Every read and write of job rows. State changes are guarded updates:
`UPDATE jobs SET status=:to WHERE id=:id AND status IN (:expected)`; a
transition that finds the row in another state changes nothing and says so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Row, bindparam, delete, func, insert, literal, null, select, tuple_, update
from sqlalchemy.orm import Session, make_transient_to_detached

from jobs.events import stage as stage_event
from jobs.events import stage_to, study_stream_key
from jobs.limits import (
    PROJECT_LIMITS_LOCKED,
    LimitExceeded,
    ProjectLimits,
    QuotaExceeded,
    check_room_for_job,
    limit_breaches,
    limits_of_row,
    project_limits,
    with_default_timeout,
)
from jobs.models import DEFAULT_PROJECT, Job, JobCheckpoint, JobEvent, utcnow
from jobs.settings import settings
from jobs.spec import JobSpec
from jobs.states import ACTIVE, ALLOWED, TERMINAL, JobStatus


class InvalidCursor(ValueError):
    pass


def parse_uuid(raw: object) -> uuid.UUID | None:
    """An id (a job's, a study's, a dataset's) from a URL or a spec; None when it is not a
    UUID (the API answers 404 or 422, not 500)."""
    try:
        return uuid.UUID(raw)
    except (ValueError, TypeError, AttributeError):
        return None


def _digest_of_dump(dumped: dict[str, Any]) -> str:
    """The spec with defaults filled (`model_dump`), as canonical JSON, hashed: key order and
    defaults written out or left implicit do not make two submissions different."""
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyConflict(ValueError):
    pass


# --------------------------------------------------------------------------- creating a job

# A new job's row is written by a Core INSERT with every column's value given (its Python
# default where the gate sets none), and the ORM object is made from the same values and
# attached to the session as already persistent: the unit of work's flush of the job and
# its event row took more CPU than the rest of the job gate together. Columns with only a
# server default are left to the server (the object reads them back when they are asked for).
_SET_BY_GATE = frozenset({
    "id", "created_at", "project", "name", "status", "spec", "total_steps", "latest_metrics", "enqueued_at",
    "idempotency_key", "spec_sha256", "pool", "submitted_by_key_id",
})  # fmt: skip
_DEFAULTED = {
    column.key: column.default
    for column in Job.__table__.columns
    if column.key not in _SET_BY_GATE and (column.default is not None or column.server_default is None)
}
_NEW_JOB_COLUMNS = sorted(_SET_BY_GATE | set(_DEFAULTED))
# A JSON column left empty is SQL NULL, as the ORM writes it: a None bound to it would be JSON's 'null'.
_INSERTED = [
    key for key in _NEW_JOB_COLUMNS
    if not (isinstance(Job.__table__.c[key].type, JSON) and key in _DEFAULTED and _DEFAULTED[key] is None)
]  # fmt: skip


# The gate binds these as values: a default computed by the database (an SQL expression)
# would need the ORM's flush, which the gate no longer runs.
assert not [key for key, d in _DEFAULTED.items() if d is not None and not (d.is_scalar or d.is_callable)], (
    "a column of jobs has an SQL-expression default: the job gate (create_job) binds defaults as values"
)


def _defaults() -> dict[str, Any]:
    """The Python defaults of the columns the gate does not set (a fresh one each: a list, a dict)."""
    values = {}
    for key, default in _DEFAULTED.items():
        if default is None:
            values[key] = None
        elif default.is_callable:
            values[key] = default.arg(None)  # SQLAlchemy's wrapper takes the execution context
        else:
            values[key] = default.arg
    return values


_INSERT_JOB = insert(Job).values({key: bindparam(key) for key in _INSERTED})
# PostgreSQL: the job, its event and the project's quota lock (limits.PROJECT_LIMITS_LOCKED)
# in one statement, one round trip instead of three; the event's insert reads the job's id
# from the job's (data-modifying CTEs). The lock does not conflict with the KEY SHARE lock
# the inserts' foreign key takes; the quota's count still comes after the lock, in a
# statement of its own, so that its snapshot sees what the lock's previous holder committed.
_new_job = _INSERT_JOB.returning(Job.id, Job.created_at).cte("new_job")
_INSERT_JOB_EVENT_AND_LOCK = PROJECT_LIMITS_LOCKED.add_cte(
    _new_job,
    insert(JobEvent)
    .from_select(["job_id", "from_status", "to_status", "at"],
                 select(_new_job.c.id, null(), literal(JobStatus.queued.value), _new_job.c.created_at))
    .cte("new_event"),
)  # fmt: skip


def _insert_job_rows(session: Session, values: dict[str, Any]) -> ProjectLimits:
    """Write the job's row and its first event, and lock the project (project_limits(lock=True));
    its limits."""
    connection = session.connection()
    # Only the inserted columns' values: SQLAlchemy would add a column for any other key.
    inserted = {key: values[key] for key in _INSERTED}
    if connection.dialect.name == "postgresql":
        return limits_of_row(connection.execute(_INSERT_JOB_EVENT_AND_LOCK, inserted).first(), settings)
    connection.execute(_INSERT_JOB, inserted)
    connection.execute(
        insert(JobEvent), {"job_id": values["id"], "from_status": None, "to_status": JobStatus.queued, "at": values["created_at"]}
    )
    return project_limits(session=session, project=values["project"], limits=settings, lock=True)


def create_job(
    *, session: Session, spec: JobSpec, idempotency_key: str | None = None, project: str = DEFAULT_PROJECT,
    submitted_by_key_id: uuid.UUID | None = None,
) -> tuple[Job, bool]:
    """(job, created). With an idempotency key the project already used for the same
    spec, the earlier job and False; for another spec, IdempotencyConflict.
    `submitted_by_key_id`: the API key that submitted it (or its study), which its MLflow
    run names as its user; None for the bootstrap key.

    The one gate every job row passes, whoever creates it (a submission, a study's trial,
    a configuration a sampler proposed): LimitExceeded when the spec asks for more than
    this server runs (checked before anything is written), QuotaExceeded when the project
    already holds as many jobs as it may (nothing it wrote is left behind). A spec without
    a timeout gets DEFAULT_TIMEOUT_S."""
    spec = with_default_timeout(spec, settings)
    dumped = spec.model_dump(mode="json")
    digest = _digest_of_dump(dumped)
    if idempotency_key is not None:
        earlier = session.scalar(
            select(Job).where(Job.project == project, Job.idempotency_key == idempotency_key)
        )
        if earlier is not None:
            if earlier.spec_sha256 != digest:
                raise IdempotencyConflict(
                    f"Idempotency-Key {idempotency_key!r} was used for job {earlier.id} with a different spec"
                )
            return earlier, False
    if breaches := limit_breaches(spec, settings):
        raise LimitExceeded(breaches)
    # The rows are written before the project's quota is counted under the project's lock
    # (taken by the inserts' own statement on PostgreSQL, by the next one elsewhere): the
    # lock is then held for the count and the commit only, not for a round trip of inserts
    # as well, since concurrent submissions of one project wait for it one after the other.
    session.flush()  # anything the session holds goes first, as the ORM's own order would have it
    now = utcnow()
    values = _defaults() | {
        "id": uuid.uuid4(), "created_at": now, "project": project, "name": spec.name, "status": JobStatus.queued,
        "spec": dumped, "total_steps": spec.total_steps, "latest_metrics": {}, "enqueued_at": now,
        "idempotency_key": idempotency_key, "spec_sha256": digest, "pool": spec.resources.pool,
        "submitted_by_key_id": submitted_by_key_id,
    }  # fmt: skip
    # A concurrent twin with the same key fails here, on the unique index (IntegrityError).
    locked = _insert_job_rows(session, values)
    try:
        check_room_for_job(session=session, project=project, limits=settings, added=1, locked=locked)
    except QuotaExceeded:
        # Refused: the gate takes back what it wrote, whatever its caller does next.
        session.execute(delete(JobEvent).where(JobEvent.job_id == values["id"]).execution_options(synchronize_session=False))
        session.execute(delete(Job).where(Job.id == values["id"]).execution_options(synchronize_session=False))
        raise
    job = Job(**values)
    make_transient_to_detached(job)  # the row exists: the session takes the object as loaded from it
    session.add(job)
    stage_event(session, job.id, "state", {"status": JobStatus.queued, "from": None, "detail": None, "at": now})
    return job, True


def get_job(*, session: Session, job_id: uuid.UUID, project: str | None = None) -> Job | None:
    """The job; with `project`, only if it belongs to that project (the API's view:
    another project's job does not exist for the caller)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or (project is not None and job.project != project):
        return None
    return job


# What a job's public answer shows (api/schemas.JobPublic.from_row), and its pool (for the
# waiting reason): GET /v1/jobs/{id}, the API's most frequent read, takes these columns
# as a plain row. Loading the ORM object instead (every column, an identity map entry)
# took twice the CPU of the whole query.
_JOB_VIEW = select(
    Job.id, Job.project, Job.name, Job.status, Job.spec, Job.created_at, Job.started_at, Job.finished_at,
    Job.attempts, Job.epoch, Job.step, Job.total_steps, Job.latest_metrics, Job.mlflow_experiment_id,
    Job.mlflow_run_id, Job.error_type, Job.error_message, Job.study_id, Job.config_id, Job.trial_number,
    Job.pack_id, Job.diagnostics, Job.pool, Job.trained_at,
).where(Job.id == bindparam("job_id"), Job.project == bindparam("project"))


def read_job_view(*, session: Session, job_id: uuid.UUID, project: str) -> Row[Any] | None:
    """The job's public columns, read only if it belongs to `project`; None otherwise."""
    return session.connection().execute(_JOB_VIEW, {"job_id": job_id, "project": project}).first()


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = raw.split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidCursor("cursor is not one this API returned") from exc


def list_jobs(
    *,
    session: Session,
    project: str,
    status: JobStatus | None = None,
    limit: int = 20,
    cursor: str | None = None,
    study_id: uuid.UUID | None = None,
) -> tuple[list[Job], str | None]:
    """The project's jobs (of one study, when given), newest first, keyset-paginated on (created_at, id)."""
    query = (
        select(Job).where(Job.project == project).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    )
    if status is not None:
        query = query.where(Job.status == status)
    if study_id is not None:
        query = query.where(Job.study_id == study_id)
    if cursor:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    rows = list(session.scalars(query))
    more = len(rows) > limit
    items = rows[:limit]
    return items, (_encode_cursor(items[-1]) if more and items else None)


def transition(
    *,
    session: Session,
    job_id: uuid.UUID,
    expected: Iterable[JobStatus],
    to: JobStatus,
    detail: str | None = None,
    values: dict[str, Any] | None = None,
    attempt: int | None = None,
) -> JobStatus | None:
    """Move a job from one of `expected` to `to`, recording the event.

    Returns the status it moved from, or None when the row was in no expected
    state (a duplicate delivery, a race with cancel): nothing is written then.
    With `attempt`, only that attempt's worker may move it: a worker that lost
    its lease (and whose job runs elsewhere now) changes nothing.
    """
    expected = [s for s in expected if to in ALLOWED.get(s, ())]
    now = utcnow()
    changes: dict[str, Any] = {"status": to, **(values or {})}
    if to in TERMINAL:
        changes.setdefault("finished_at", now)
        # A run is open until someone says it was ended: callers that ended it pass False.
        changes.setdefault("mlflow_run_to_end", Job.mlflow_run_id.is_not(None))
    for from_status in expected:
        guard = [Job.id == job_id, Job.status == from_status]
        if attempt is not None:
            guard.append(Job.attempts == attempt)
        moved = session.execute(
            update(Job)
            .where(*guard)
            .values(**changes)
            .returning(Job.study_id)  # the row's study, read by the same statement
            .execution_options(synchronize_session=False)
        ).first()
        if moved is not None:
            session.add(JobEvent(job_id=job_id, from_status=from_status, to_status=to, at=now, detail=detail))
            session.flush()
            event = {"status": to, "from": from_status, "detail": detail, "at": now}
            stage_event(session, job_id, "state", event, final=to in TERMINAL)
            if (study_id := moved.study_id) is not None:  # a study's stream follows its trials too
                stage_to(session, study_stream_key(study_id), "trial", event | {"job_id": str(job_id)})
            return from_status
    return None


# pg_advisory_xact_lock's key for "a worker is choosing its next job" (any constant
# no other part of Descent uses).
CLAIM_LOCK_KEY = 0x44455343  # "DESC"


def _lease_until(lease_s: float | None) -> datetime:
    return utcnow() + timedelta(seconds=lease_s if lease_s is not None else settings.lease_s)


def claim_job(
    *, session: Session, job_id: uuid.UUID, worker: str | None = None, lease_s: float | None = None
) -> int | None:
    """queued -> running for exactly one worker; returns the attempt number, None for a duplicate."""
    now = utcnow()
    moved = transition(
        session=session,
        job_id=job_id,
        expected=[JobStatus.queued],
        to=JobStatus.running,
        values={
            "attempts": Job.attempts + 1,
            "started_at": func.coalesce(Job.started_at, now),  # the first attempt's start: timeouts count from it
            "lease_until": _lease_until(lease_s),
            "worker": worker,
            "trained_at": None,  # an earlier attempt's: this one trains again
        },
    )
    if moved is None:
        return None
    return session.scalar(select(Job.attempts).where(Job.id == job_id))


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    attempt: int


def mark_trained(*, session: Session, trained: list[tuple[Claim, dict[str, float | None]]]) -> None:
    """These attempts finished training, with these final metrics (their results are on their
    way to MLflow): each job's trained_at and latest metrics, written only while that attempt
    still runs it."""
    now = utcnow()
    for claim, metrics in trained:
        session.execute(
            update(Job)
            .where(Job.id == claim.job_id, Job.attempts == claim.attempt, Job.status.in_(list(ACTIVE)))
            .values(trained_at=now, latest_metrics=metrics)
            .execution_options(synchronize_session=False)
        )


def trained_at_or_marked(at: datetime) -> Any:
    """A job's trained_at for its final transition: when mark_trained marked it (a study's
    trial gives its place back then), else `at`, when its training ended."""
    return func.coalesce(Job.trained_at, at)


def fairest_queued_job(*, session: Session, pool: str | None = None) -> uuid.UUID | None:
    """The queued job to run next: the oldest of the project with the fewest jobs running
    (fair share between projects, first come first served within one). With `pool`, only
    that pool's jobs, and the share counts the jobs running in that pool (its devices are
    what projects share). Locked until the session ends; rows other claimers hold are skipped."""
    running_query = select(Job.project, func.count().label("running")).where(Job.status.in_(list(ACTIVE)))
    queued = [Job.status == JobStatus.queued]
    if pool is not None:
        running_query = running_query.where(Job.pool == pool)
        queued.append(Job.pool == pool)
    running = running_query.group_by(Job.project).subquery()
    query = (
        select(Job.id)
        .outerjoin(running, running.c.project == Job.project)
        .where(*queued)
        .order_by(func.coalesce(running.c.running, 0), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(of=Job, skip_locked=True)
    )
    return session.scalar(query)


def claim_next_job(
    *, session: Session, worker: str | None = None, lease_s: float | None = None, pool: str | None = None
) -> Claim | None:
    """A delivered message is a slot, not an order: the worker runs the fairest queued job
    (see fairest_queued_job), which need not be the one the message named. None when
    nothing is queued (a duplicate delivery, jobs cancelled while queued): a no-op.
    A worker passes the pool it serves: a message of its pool's queue is a slot of that
    pool, never another pool's job (None: any pool, for tools and tests).

    Claims are taken one at a time (a transaction-scoped advisory lock on PostgreSQL;
    SQLite serialises writers anyway), so that two workers starting together count each
    other's claim: otherwise both would see a project with nothing running and both
    take its jobs. The lock is held until the caller's session ends, which is short."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))
    for _ in range(3):  # a job cancelled between the pick and the claim: pick again
        job_id = fairest_queued_job(session=session, pool=pool)
        if job_id is None:
            return None
        attempt = claim_job(session=session, job_id=job_id, worker=worker, lease_s=lease_s)
        if attempt is not None:
            return Claim(job_id, attempt)
    return None


def claim_pack_mates(
    *,
    session: Session,
    job: Job,
    fits: Callable[[dict[str, Any]], bool],
    max_size: int,
    worker: str | None = None,
    lease_s: float | None = None,
) -> tuple[uuid.UUID, list[Claim]]:
    """Claim up to `max_size` queued trials of `job`'s study that train in one pack with it
    (`fits(spec)`: the caller's rule, jobs/packing.py), each with claim_job as if a message
    had named it (its own attempt and lease); then (pack id, the mates' claims), the pack id
    written on `job` and on every mate. No mates: no pack id is written.

    Call it in the transaction that claimed `job` (claim_next_job's advisory lock still
    held): no other worker chooses meanwhile. Only first attempts pack: a trial that ran
    before resumes alone from its own checkpoint (its pack's trials may have stopped at
    different steps). The mates' queue messages find nothing of theirs queued later: a
    message is a slot, so they run the next queued job instead, or nothing."""
    pack_id = uuid.uuid4()
    if job.study_id is None or max_size <= 0:
        return pack_id, []
    candidates = session.execute(
        select(Job.id, Job.spec)
        .where(Job.study_id == job.study_id, Job.status == JobStatus.queued, Job.attempts == 0, Job.id != job.id)
        .order_by(Job.created_at, Job.id)
        .limit(max(4 * max_size, 64))  # a study keeps `parallelism` trials queued or running; a pack takes max_size
        .with_for_update(of=Job, skip_locked=True)
    ).all()
    claims: list[Claim] = []
    for mate_id, spec in candidates:
        if len(claims) >= max_size:
            break
        if not fits(spec):
            continue
        attempt = claim_job(session=session, job_id=mate_id, worker=worker, lease_s=lease_s)
        if attempt is not None:
            claims.append(Claim(mate_id, attempt))
    if claims:
        session.execute(
            update(Job).where(Job.id.in_([job.id, *(c.job_id for c in claims)])).values(pack_id=pack_id)
            .execution_options(synchronize_session=False)
        )  # fmt: skip
    return pack_id, claims


@dataclass(frozen=True)
class CancelOutcome:
    accepted: bool
    status: JobStatus


def request_cancel(
    *, session: Session, job_id: uuid.UUID, project: str | None = None
) -> CancelOutcome | None:
    """Cancel a queued job now, ask a running one to stop; None when the job does not
    exist (in `project`, when given)."""
    for _ in range(3):  # the job may change state under us (claimed, finished); look again
        job = get_job(session=session, job_id=job_id, project=project)
        if job is None:
            return None
        status = JobStatus(job.status)
        if status in TERMINAL:
            return CancelOutcome(accepted=False, status=status)
        if status == JobStatus.cancelling:
            return CancelOutcome(accepted=True, status=status)
        to = JobStatus.cancelled if status == JobStatus.queued else JobStatus.cancelling
        detail = "cancelled before it started" if to == JobStatus.cancelled else "cancel requested"
        if transition(session=session, job_id=job_id, expected=[status], to=to, detail=detail):
            return CancelOutcome(accepted=True, status=to)
    job = get_job(session=session, job_id=job_id)
    assert job is not None
    return CancelOutcome(accepted=JobStatus(job.status) not in TERMINAL, status=JobStatus(job.status))


def record_progress(
    *,
    session: Session,
    job_id: uuid.UUID,
    epoch: int,
    step: int,
    metrics: dict[str, float],
    attempt: int | None = None,
    lease_s: float | None = None,
) -> JobStatus | None:
    """Write a running job's progress (and renew its lease); returns its status: the
    worker stops on `cancelling` and on a final status, and on None, which with
    `attempt` means the job is no longer this attempt's (its lease ran out and the
    reaper gave it to another)."""
    guard = [Job.id == job_id, Job.status.in_(list(ACTIVE))]
    values: dict[str, Any] = {"epoch": epoch, "step": step, "latest_metrics": metrics}
    if attempt is not None:
        guard.append(Job.attempts == attempt)
        values["lease_until"] = _lease_until(lease_s)
    written = session.execute(update(Job).where(*guard).values(**values).execution_options(synchronize_session=False))
    row = session.execute(
        select(Job.status, Job.total_steps, Job.started_at, Job.attempts).where(Job.id == job_id)
    ).first()
    if row is None:
        return None
    status, total_steps, started_at, attempts = row
    if attempt is not None and written.rowcount == 0:
        # Not written: another attempt owns the job (None), or this attempt already ended
        # it (its final status, so that the worker stops without crying "lease lost").
        return JobStatus(status) if attempts == attempt and status in TERMINAL else None
    if attempt is not None:  # the running attempt's heartbeat: what a live view shows
        stage_event(session, job_id, "progress", progress_of(epoch, step, total_steps, started_at) | {"metrics": metrics})
    return JobStatus(status)


def progress_of(epoch: int, step: int, total_steps: int, started_at: datetime | None) -> dict[str, Any]:
    """Where a job is, and when it should end at its pace so far (from its first start)."""
    fraction = round(min(1.0, step / total_steps), 4) if total_steps else 0.0
    eta_s = None
    if started_at is not None and 0 < step < total_steps:
        elapsed = (utcnow() - started_at).total_seconds()
        eta_s = round(elapsed * (total_steps - step) / step, 1)
    return {"epoch": epoch, "step": step, "total_steps": total_steps, "fraction": fraction, "eta_s": eta_s}


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class SavedCheckpoint:
    # The checkpoint this one replaced, where it was an object in the artifact store: delete it
    # once this one is committed (never before: a crash in between leaves an unused object,
    # not a row pointing to nothing).
    replaced_object_uri: str | None


def save_checkpoint(
    *,
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    step: int,
    epoch: int,
    data: bytes | None = None,
    object_uri: str | None = None,
    size_bytes: int | None = None,
    sha256: str | None = None,
) -> SavedCheckpoint | None:
    """Replace the job's checkpoint, if this attempt still owns the job (else None): its bytes
    (`data`), or the pointer to them in the artifact store (`object_uri`); with the size and
    SHA-256 they must read back with."""
    owns = session.scalar(
        select(Job.id).where(Job.id == job_id, Job.attempts == attempt, Job.status.in_(list(ACTIVE)))
    )
    if owns is None:
        return None
    replaced = session.scalar(select(JobCheckpoint.object_uri).where(JobCheckpoint.job_id == job_id))
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id))
    session.add(JobCheckpoint(job_id=job_id, step=step, epoch=epoch, attempt=attempt, data=data,
                              object_uri=object_uri, size_bytes=size_bytes, sha256=sha256))  # fmt: skip
    session.flush()
    return SavedCheckpoint(replaced if replaced != object_uri else None)


def load_checkpoint(*, session: Session, job_id: uuid.UUID) -> JobCheckpoint | None:
    return session.get(JobCheckpoint, job_id)


# --------------------------------------------------------------------------- recovery


@dataclass(frozen=True)
class ReapedJob:
    job_id: uuid.UUID
    status: JobStatus  # what the reaper made of it: queued (to run again), failed or cancelled
    pool: str  # whose queue a requeued job goes back to


def reap_lost_jobs(*, session: Session, now: datetime | None = None) -> list[ReapedJob]:
    """Active jobs whose lease ran out: their worker died. Requeue while attempts remain
    (the next attempt resumes from the checkpoint), else fail them; a job being
    cancelled is simply cancelled. Rows another reaper holds are skipped."""
    now = now or utcnow()
    lost = session.scalars(
        select(Job)
        .where(Job.status.in_(list(ACTIVE)), Job.lease_until < now)
        .with_for_update(skip_locked=True)
    ).all()
    reaped = []
    for job in lost:
        max_attempts = JobSpec.model_validate(job.spec).max_attempts
        where = f"worker {job.worker or '?'} stopped renewing its lease (attempt {job.attempts} of {max_attempts})"
        if job.status == JobStatus.cancelling:
            to, values = JobStatus.cancelled, {}
        elif job.attempts < max_attempts:
            to, values = JobStatus.queued, {"enqueued_at": now, "trained_at": None}  # its next attempt trains again
        else:
            to = JobStatus.failed
            values = {"error_type": "WorkerLost", "error_message": f"worker lost: {where}; no attempts left"}
        values |= {"lease_until": None, "worker": None}
        if transition(session=session, job_id=job.id, expected=[JobStatus(job.status)], to=to,
                      detail=f"worker lost: {where}", values=values):  # fmt: skip
            reaped.append(ReapedJob(job.id, to, job.pool))  # its run is ended by runs_to_end's pass
    return reaped


def runs_to_end(*, session: Session, limit: int = 100) -> list[tuple[uuid.UUID, str, str | None, JobStatus]]:
    """(job id, run id, experiment id, job status) of finished jobs whose MLflow run may
    still be RUNNING, locked until the session ends (other reapers skip them)."""
    rows = session.execute(
        select(Job.id, Job.mlflow_run_id, Job.mlflow_experiment_id, Job.status)
        .where(Job.mlflow_run_to_end.is_(True), Job.status.in_(list(TERMINAL)), Job.mlflow_run_id.is_not(None))
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    return [(job_id, run_id, experiment_id, JobStatus(status)) for job_id, run_id, experiment_id, status in rows]


def mark_run_ended(*, session: Session, job_id: uuid.UUID) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(mlflow_run_to_end=False).execution_options(synchronize_session=False)
    )


def count_queued(*, session: Session, pool: str | None = None) -> int:
    query = select(func.count()).select_from(Job).where(Job.status == JobStatus.queued)
    if pool is not None:
        query = query.where(Job.pool == pool)
    return session.scalar(query) or 0


def queued_by_pool(*, session: Session) -> dict[str, int]:
    """{pool: queued jobs} of the pools that have any."""
    rows = session.execute(
        select(Job.pool, func.count()).where(Job.status == JobStatus.queued).group_by(Job.pool)
    ).all()
    return {pool: count for pool, count in rows}


def claim_unclaimed(
    *, session: Session, older_than_s: float, limit: int, now: datetime | None = None, pool: str | None = None
) -> list[uuid.UUID]:
    """Up to `limit` queued jobs (of `pool`, when given), oldest first, that waited
    `older_than_s` since they were last sent (the broker lost their message): their
    enqueue time is bumped and the ids returned, to be enqueued again."""
    now = now or utcnow()
    if limit <= 0:
        return []
    waiting = [Job.status == JobStatus.queued, Job.enqueued_at < now - timedelta(seconds=older_than_s)]
    if pool is not None:
        waiting.append(Job.pool == pool)
    ids = list(
        session.scalars(
            select(Job.id)
            .where(*waiting)
            .order_by(Job.enqueued_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids)).values(enqueued_at=now).execution_options(synchronize_session=False)
        )
    return ids


def set_mlflow_run(*, session: Session, job_id: uuid.UUID, experiment_id: str, run_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(mlflow_experiment_id=experiment_id, mlflow_run_id=run_id)
        .execution_options(synchronize_session=False)
    )


def list_events(*, session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
