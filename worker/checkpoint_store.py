"""Where a job's checkpoint is kept, and reading it back checked.

Up to CHECKPOINT_INLINE_MAX_BYTES a checkpoint is bytes in its PostgreSQL row (one round
trip; tiny models, laptops). A larger one is an object in MLflow's artifact store
(jobs/artifact_store.py) at `descent/checkpoints/<job>/<attempt>-<step>.pt`, and the row
keeps the pointer. Either way the row keeps the size and SHA-256, and a resume reads the
bytes back against them: a checkpoint that differs fails the job as `checkpoint_corrupt`,
never resumes it silently from something else.

One checkpoint per job is kept: the object of the one a new checkpoint replaces is deleted
once the new row is committed. The last one stays after the job ends, as in PostgreSQL.
"""

from __future__ import annotations

import logging
import uuid

from jobs import artifact_store
from jobs.artifact_store import ArtifactCorrupt, ArtifactMissing, ArtifactStoreUnreachable, StoredObject
from jobs.db import session_scope
from jobs.models import JobCheckpoint
from jobs.repository import save_checkpoint
from jobs.settings import settings

log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
    """The checkpoint read back is not the one the job stored."""

    error_type = "checkpoint_corrupt"


class CheckpointUnavailable(RuntimeError):
    """The checkpoint's object is gone, or the artifact store stayed unreachable."""

    error_type = "checkpoint_unavailable"


def goes_to_store(size_bytes: int) -> bool:
    return size_bytes > settings.checkpoint_inline_max_bytes


def checkpoint_uri(job_id: uuid.UUID, attempt: int, step: int) -> str:
    return artifact_store.object_uri("checkpoints", str(job_id), f"{attempt}-{step}.pt")


def store_checkpoint(*, job_id: uuid.UUID, attempt: int, step: int, epoch: int, data: bytes) -> bool:
    """Record `data` as the job's checkpoint; False when the attempt no longer owns the job.
    Raises when the store or the database failed (the caller tries again later)."""
    if goes_to_store(len(data)):
        stored = artifact_store.put_object(checkpoint_uri(job_id, attempt, step), data)
        inline = None
    else:
        stored = StoredObject("", len(data), artifact_store.sha256_of(data))
        inline = data
    # A failure from here on leaves the object unused, never a row pointing to nothing.
    with session_scope() as session:
        saved = save_checkpoint(
            session=session, job_id=job_id, attempt=attempt, step=step, epoch=epoch, data=inline,
            object_uri=stored.uri or None, size_bytes=stored.size_bytes, sha256=stored.sha256,
        )  # fmt: skip
    if saved is None:
        if stored.uri:
            artifact_store.delete_object(stored.uri)  # never recorded: nobody reads it
        return False
    if saved.replaced_object_uri:
        artifact_store.delete_object(saved.replaced_object_uri)
    return True


def where_kept(checkpoint: JobCheckpoint) -> str:
    return checkpoint.object_uri or "PostgreSQL"


def read_checkpoint(checkpoint: JobCheckpoint) -> bytes:
    """The checkpoint's bytes, checked against the size and SHA-256 recorded with it (rows from
    before migration 0017 recorded none: their bytes are the row's). CheckpointCorrupt or
    CheckpointUnavailable, in words, when they cannot be had."""
    what = f"the checkpoint of step {checkpoint.step} (stored by attempt {checkpoint.attempt})"
    if checkpoint.object_uri is None:
        data = checkpoint.data or b""
        if checkpoint.sha256 is not None and artifact_store.sha256_of(data) != checkpoint.sha256:
            raise CheckpointCorrupt(
                f"{what} in PostgreSQL does not match the SHA-256 recorded with it; the job will not resume from it "
                "(submit it again to train from the start)"
            )
        return data
    stored = StoredObject(checkpoint.object_uri, checkpoint.size_bytes or 0, checkpoint.sha256 or "")
    try:
        return artifact_store.get_object_waiting(stored, settings.artifact_store_wait_s)
    except ArtifactCorrupt as exc:
        raise CheckpointCorrupt(
            f"{what} is not the one this job stored in MLflow's artifact store: {exc} (the object was changed or "
            "damaged in the store); the job will not resume from it (submit it again to train from the start)"
        ) from exc
    except ArtifactMissing as exc:
        raise CheckpointUnavailable(f"{what} is gone from MLflow's artifact store ({exc}); the job cannot resume "
                                    "(submit it again to train from the start)") from exc  # fmt: skip
    except ArtifactStoreUnreachable as exc:
        raise CheckpointUnavailable(f"{what} could not be read for {settings.artifact_store_wait_s:g} s "
                                    f"(ARTIFACT_STORE_WAIT_S): {exc}") from exc  # fmt: skip
