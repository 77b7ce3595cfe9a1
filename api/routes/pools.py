"""/v1/pools: the device pools, their live workers and devices, and how busy they are.

Any valid key may read it. The worker names and devices describe the deployment, not a
project; the job counts are of every project (a pool's devices are shared, and how
busy they are is what a caller choosing a pool needs) and, beside them, of the caller's
own project. Counts only: no other project's job, name or spec is shown.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import CallerDep, SessionDep
from api.schemas import AUTH_RESPONSES
from jobs import pools

router = APIRouter(prefix="/v1/pools", tags=["pools"], responses=AUTH_RESPONSES)


class DevicePublic(BaseModel):
    kind: str = Field(description="cuda or cpu.")
    name: str | None = None
    memory_mb: int | None = Field(None, description="The device's memory (a CPU: the machine's).")


class PoolWorkerPublic(BaseModel):
    name: str = Field(description="The worker's Celery node name, `<name>@<host>`.")
    devices: list[DevicePublic]
    concurrency: int = Field(description="Jobs the worker runs at once.")
    started_at: datetime
    last_seen: datetime


class PoolPublic(BaseModel):
    name: str
    live_workers: list[PoolWorkerPublic] = Field(description="Workers whose heartbeats keep coming.")
    devices: list[DevicePublic] = Field(description="The live workers' devices together.")
    last_seen: datetime | None = Field(description="The last heartbeat of any of its workers (None: never had one).")
    running: int = Field(description="Jobs running in the pool, every project's.")
    queued: int = Field(description="Jobs waiting for the pool, every project's.")
    project_running: int = Field(description="Of `running`, the caller's project's.")
    project_queued: int = Field(description="Of `queued`, the caller's project's.")


class PoolsPublic(BaseModel):
    items: list[PoolPublic]


@router.get("", response_model=PoolsPublic)
def list_pools(session: SessionDep, caller: CallerDep) -> PoolsPublic:
    """Every pool a worker has served (and the default pool), its live workers (seen within three
    heartbeats, WORKER_HEARTBEAT_INTERVAL_S), their devices, its running and queued jobs."""
    items = []
    for view in pools.pool_views(session=session, project=caller.project):
        workers = [
            PoolWorkerPublic(name=w.name, devices=[DevicePublic.model_validate(d) for d in w.devices or []],
                             concurrency=w.concurrency, started_at=w.started_at, last_seen=w.last_seen)  # fmt: skip
            for w in view.live_workers
        ]
        items.append(PoolPublic(
            name=view.name, live_workers=workers, devices=[d for w in workers for d in w.devices],
            last_seen=view.last_seen, running=view.running, queued=view.queued,
            project_running=view.project_running, project_queued=view.project_queued,
        ))  # fmt: skip
    return PoolsPublic(items=items)
