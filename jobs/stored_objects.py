"""Which objects in the artifact store jobs' rows point to (for the sweep of unused
checkpoints, worker/artifact_sweeper.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import Job, JobCheckpoint
from jobs.states import TERMINAL


@dataclass(frozen=True)
class JobObjects:
    """A job as the sweep sees it: whether it has ended, and the object its checkpoint row
    points to (None: no checkpoint, or one held in the row)."""

    ended: bool
    checkpoint_uri: str | None


def jobs_objects(*, session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, JobObjects]:
    """Those of `job_ids` that exist."""
    rows = session.execute(
        select(Job.id, Job.status, JobCheckpoint.object_uri)
        .outerjoin(JobCheckpoint, JobCheckpoint.job_id == Job.id)
        .where(Job.id.in_(job_ids))
    )
    return {job_id: JobObjects(status in TERMINAL, uri) for job_id, status, uri in rows}

