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
    pruned = "pruned"  # a study's trial stopped early because it was losing (its worker freed at once)


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.pruned})
ACTIVE = frozenset({JobStatus.running, JobStatus.cancelling})

# A transition not listed here never happens; the repository refuses it.
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: the reaper requeues a job whose worker was lost; the next attempt resumes it.
    JobStatus.running: frozenset(
        {JobStatus.queued, JobStatus.cancelling, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled,
         JobStatus.pruned}
    ),  # fmt: skip
    # A job asked to stop may still finish (the request came after its last step) or fail.
    JobStatus.cancelling: frozenset({JobStatus.cancelled, JobStatus.succeeded, JobStatus.failed}),
}


class StudyStatus(StrEnum):
    running = "running"  # trials are queued or running, or more will be created
    succeeded = "succeeded"  # every trial ended and at least one succeeded
    failed = "failed"  # every trial ended and none succeeded
    cancelled = "cancelled"


STUDY_TERMINAL = frozenset({StudyStatus.succeeded, StudyStatus.failed, StudyStatus.cancelled})
