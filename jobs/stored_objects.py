"""Which rows point to objects in the artifact store (for the sweep of unused objects,
worker/artifact_sweeper.py)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import Dataset, Job, JobCheckpoint
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


def dataset_uris_in_use(*, session: Session, uris: list[str]) -> set[str]:
    """Those of `uris` a dataset row points to."""
    if not uris:
        return set()
    return set(session.scalars(select(Dataset.object_uri).where(Dataset.object_uri.in_(uris))))
