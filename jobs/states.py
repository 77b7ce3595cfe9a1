"""The job state machine: which status may follow which."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
ACTIVE = frozenset({JobStatus.running, JobStatus.cancelling})

# A transition not listed here never happens; the repository refuses it.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: the reaper requeues a job whose worker was lost; the next attempt resumes it.
    JobStatus.running: frozenset(
        {JobStatus.queued, JobStatus.cancelling, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}
    ),
    # A job asked to stop may still finish (the request came after its last step) or fail.
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.succeeded, JobStatus.failed}),
}
