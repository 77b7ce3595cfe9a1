"""Device pools: which workers serve which pool (their heartbeats, worker/heartbeat.py),
which pools are known, and why a queued job waits.

A pool is a name a job asks for (`resources.pool`) and a worker serves (`WORKER_POOL`);
nothing else declares it. A pool is *known* once a worker has served it (its row stays in
`workers` after it is gone), and the default pool always is: a fresh deployment takes
jobs before its first worker says hello. A worker is *live* while its heartbeats keep
coming: it said nothing for LIVE_AFTER_MISSED heartbeat intervals, or it said it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from jobs.models import Job, Worker, utcnow
from jobs.pool_names import DEFAULT_POOL
from jobs.settings import settings
from jobs.states import ACTIVE, JobStatus

LIVE_AFTER_MISSED = 3  # heartbeats a live worker may miss (a busy machine, a slow database)


def live_since(now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(seconds=LIVE_AFTER_MISSED * settings.worker_heartbeat_interval_s)


# --------------------------------------------------------------------------- a worker's heartbeats


def record_heartbeat(
    *, session: Session, name: str, pool: str, devices: list[dict[str, Any]], concurrency: int, starting: bool = False
) -> None:
    """The worker `name` is alive now; `starting`: it has just started (again), so its start
    time and its stop mark are reset. One row per worker name."""
    now = utcnow()
    values: dict[str, Any] = {"pool": pool, "devices": devices, "concurrency": concurrency, "last_seen": now}
    if starting:
        values |= {"started_at": now, "stopped_at": None}
    written = session.execute(
        update(Worker).where(Worker.name == name).values(**values).execution_options(synchronize_session=False)
    )
    if written.rowcount == 0:
        session.add(Worker(name=name, **({"started_at": now} | values)))
        session.flush()


def record_stopped(*, session: Session, name: str) -> None:
    """A clean stop: the worker is no longer live at once, not three heartbeats later."""
    session.execute(
        update(Worker).where(Worker.name == name).values(stopped_at=utcnow()).execution_options(synchronize_session=False)
    )


def prune_gone_workers(*, session: Session, now: datetime | None = None) -> int:
    """Delete the rows of workers gone (stopped, or silent) for WORKER_ROW_RETENTION_S, except
    each pool's most recently seen worker, so that the pool stays known. Worker names are
    per host (`<name>@<host>`) and containers get new hosts: without this the table would
    grow by a row a restart. Returns the rows deleted."""
    seen = func.coalesce(Worker.stopped_at, Worker.last_seen)
    cutoff = (now or utcnow()) - timedelta(seconds=settings.worker_row_retention_s)
    newer = aliased(Worker)
    newer_seen = func.coalesce(newer.stopped_at, newer.last_seen)
    seen_later_in_its_pool = (
        select(newer.name)
        .where(newer.pool == Worker.pool, or_(newer_seen > seen, and_(newer_seen == seen, newer.name < Worker.name)))
        .exists()
    )  # fmt: skip
    result = session.execute(
        delete(Worker).where(seen < cutoff, seen_later_in_its_pool).execution_options(synchronize_session=False)
    )
    return result.rowcount or 0


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class PoolState:
    live_workers: int
    last_seen: datetime | None  # of any of its workers, live or not (a stop counts as seen)


# Built once: the statement is on every submission's and every queued job's read, and
# building it (and its cache key) each time cost more than running it.
_POOL_STATES = select(
    Worker.pool,
    func.sum(case((and_(Worker.stopped_at.is_(None), Worker.last_seen >= bindparam("live_since")), 1), else_=0)),
    func.max(func.coalesce(Worker.stopped_at, Worker.last_seen)),
).group_by(Worker.pool)


def pool_states(*, session: Session, now: datetime | None = None) -> dict[str, PoolState]:
    """{pool: its state} of every pool a worker ever served: one query over a small table,
    all a submission or a queued job's answer needs."""
    rows = session.connection().execute(_POOL_STATES, {"live_since": live_since(now)}).all()
    return {pool: PoolState(int(n or 0), last) for pool, n, last in rows}


def known_pools(states: dict[str, PoolState]) -> list[str]:
    """Every pool a worker has ever served, and the default pool, sorted."""
    return sorted(set(states) | {DEFAULT_POOL})


def unknown_pool_message(pool: str, states: dict[str, PoolState]) -> str | None:
    """Why a job may not ask for `pool` (no worker has ever served it), or None."""
    if settings.allow_unknown_pools or pool == DEFAULT_POOL or pool in states:
        return None
    return (f"no worker has ever served pool '{pool}'; known pools: {', '.join(known_pools(states))} "
            "(a worker serves the pool its WORKER_POOL names)")  # fmt: skip


def waiting_reason(pool: str, states: dict[str, PoolState]) -> str | None:
    """Why a queued job of `pool` cannot start now when that is for want of a worker, else None."""
    state = states.get(pool)
    if state is not None and state.live_workers:
        return None
    if state is None or state.last_seen is None:
        return f"no live worker serves pool '{pool}' (no worker has served it yet)"
    return f"no live worker serves pool '{pool}' (last seen {state.last_seen.isoformat(timespec='seconds')})"


@dataclass
class PoolView:
    name: str
    live_workers: list[Worker] = field(default_factory=list)
    last_seen: datetime | None = None  # of any of its workers, live or not
    running: int = 0
    queued: int = 0
    project_running: int = 0
    project_queued: int = 0


def pool_views(*, session: Session, project: str, now: datetime | None = None) -> list[PoolView]:
    """Each known pool (and each pool that holds active jobs): its live workers, and its
    running and queued jobs, of every project and of `project`."""
    now = now or utcnow()
    views: dict[str, PoolView] = {name: PoolView(name) for name in known_pools(pool_states(session=session, now=now))}
    since = live_since(now)
    for worker in session.scalars(select(Worker).order_by(Worker.pool, Worker.name)):
        view = views.setdefault(worker.pool, PoolView(worker.pool))
        seen = worker.stopped_at or worker.last_seen
        view.last_seen = max(view.last_seen, seen) if view.last_seen else seen
        if worker.stopped_at is None and worker.last_seen >= since:
            view.live_workers.append(worker)
    counts = session.execute(
        select(Job.pool, Job.status, Job.project, func.count())
        .where(Job.status.in_([JobStatus.queued, *ACTIVE]))
        .group_by(Job.pool, Job.status, Job.project)
    ).all()
    for pool, status, job_project, count in counts:
        own = job_project == project
        view = views.setdefault(pool, PoolView(pool))
        if status == JobStatus.queued:
            view.queued += count
            view.project_queued += count if own else 0
        else:
            view.running += count
            view.project_running += count if own else 0
    return sorted(views.values(), key=lambda v: v.name)
