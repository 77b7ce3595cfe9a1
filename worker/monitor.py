"""The job's side of the training loop: a reporter the trainer calls, and a thread
that writes progress to PostgreSQL and notices cancel requests.

The trainer only touches memory (a deque, two ints, an Event); the thread does
the database round-trips every `interval_s`, so a step never waits on the network.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from jobs.db import session_scope
from jobs.repository import record_progress
from jobs.states import TERMINAL, JobStatus
from jobs.studies import curve_point
from trainer.checkpoint import checkpoint_to_bytes
from worker.checkpoint_store import goes_to_store, store_checkpoint
from worker.metrics_rule import STEP_METRICS
from worker.metrics_sink import MlflowMetricSink
from worker.trial_pruning import TrialPruning

log = logging.getLogger(__name__)

# The latest value of these is kept on the job row for GET /v1/jobs/{id}.
SUMMARY_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


class StopReason(StrEnum):
    cancel = "cancel"
    timeout = "timeout"
    lease_lost = "lease_lost"  # the reaper gave the job to another attempt
    pruned = "pruned"  # a study's pruner stopped this trial


# A checkpoint waiting for its metrics is kept, rather than replaced by a newer one, for this
# many of the sink's flush intervals (past that, MLflow is slow or down: the newest one waits).
KEEP_WAITING_FLUSHES = 3


@dataclass(frozen=True)
class PendingCheckpoint:
    step: int
    epoch: int
    data: bytes
    metrics_needed: int  # sink.sent must reach this before the checkpoint may be stored
    taken_at: float = 0.0  # time.monotonic() when it was taken


class JobReporter:
    def __init__(self, sink: MlflowMetricSink | None, checkpoint_min_interval_s: float = 0.0) -> None:
        self.sink = sink
        self.epoch = 0
        self.step = 0
        self.latest: dict[str, float | None] = {}
        self.stop_requested = threading.Event()
        # Asked after every step: the event's own is_set, one Python call a step instead of two.
        self.should_stop = self.stop_requested.is_set
        self.stop_reason: StopReason | None = None
        self.checkpoint_min_interval_s = checkpoint_min_interval_s
        self.pending_checkpoint: PendingCheckpoint | None = None
        self._last_checkpoint_at = -math.inf
        # A study's trial: the objective after each epoch, [step, percent of schedule, value].
        self.objective: str | None = None
        self.total_steps = 0
        self.objective_curve: list[list[float]] = []
        # Set once the attempt recorded the job's final status, with its last progress in it.
        self.concluded = False

    def request_stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stop_requested.set()

    def save_checkpoint(self, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
        # Serialised here, in the training thread (local work only); the monitor
        # thread stores it once MLflow has every metric logged before it.
        now = time.monotonic()
        if now - self._last_checkpoint_at < self.checkpoint_min_interval_s:
            return
        waiting = self.pending_checkpoint
        keep_waiting_s = KEEP_WAITING_FLUSHES * self.sink.flush_interval_s if self.sink is not None else 0.0
        if waiting is not None and now - waiting.taken_at < keep_waiting_s:
            # The one before waits for its metrics to reach MLflow, a flush or two away:
            # replaced at every offer (checkpoints more often than the sink flushes), no
            # checkpoint would ever be stored while the job trains.
            return
        self._last_checkpoint_at = now
        data = checkpoint_to_bytes(make_state())
        if self.sink is not None:
            self.sink.end_window()  # a resume from here must not lose the steps of a half-full window
        needed = self.sink.added if self.sink is not None else 0
        self.pending_checkpoint = PendingCheckpoint(step, self.epoch, data, needed, now)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.sink is not None:
            if metrics.keys() == STEP_METRICS:  # a per-step row (the packed recipe's): under the job's rule
                self.sink.add_rows([(step, metrics)])
            else:
                self.sink.add(step, metrics)
        self.keep_latest(metrics)
        if self.objective is not None and "epoch" in metrics and self.objective in metrics:
            self.objective_curve.append(curve_point(step, self.total_steps, metrics[self.objective]))

    def log_metric_rows(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """A window of per-step rows at once (the trainer's StepWindow): one timestamp, one
        pass; the same points as log_metrics row by row, at a third of the cost a step."""
        if not rows:
            return
        if self.sink is not None:
            self.sink.add_rows(rows)
        self.keep_latest(rows[-1][1])  # (every row has the same names: the last one is the latest)
        if self.objective is not None:
            for step, metrics in rows:
                if "epoch" in metrics and self.objective in metrics:
                    self.objective_curve.append(curve_point(step, self.total_steps, metrics[self.objective]))

    def keep_latest(self, metrics: Mapping[str, float]) -> None:
        for key in SUMMARY_METRICS:
            if key in metrics:  # JSON (and PostgreSQL's JSONB) has no NaN or infinity
                self.latest[key] = metrics[key] if math.isfinite(metrics[key]) else None

    def progress(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step


class JobMonitor:
    """Every `interval_s`: write progress and renew the lease (guarded by the attempt),
    stop the loop on cancel, timeout or a lost lease, store a ready checkpoint."""

    def __init__(
        self,
        job_id: uuid.UUID,
        reporter: JobReporter,
        interval_s: float,
        attempt: int | None = None,
        lease_s: float | None = None,
        deadline: datetime | None = None,
    ) -> None:
        self.job_id = job_id
        self.reporter = reporter
        self.interval_s = interval_s
        self.attempt = attempt
        self.lease_s = lease_s
        self.deadline = deadline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-monitor-{str(job_id)[:8]}", daemon=True)
        self.pruning: TrialPruning | None = None  # set for a study's trial
        self._storing: threading.Thread | None = None  # a checkpoint on its way to the artifact store
        self.last_renewed = time.monotonic()  # the claim has just taken the lease

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.report_final_curve()
        if not self.reporter.concluded:  # (the final transition wrote it: three round trips saved)
            self.write_progress()

    def report_final_curve(self) -> None:
        """A trial's whole objective curve goes to its pruner, ticks or not (before the study
        is moved on, which tells Optuna the trial ended)."""
        if self.pruning is None or self.reporter.stop_reason == StopReason.lease_lost:
            return
        try:
            self.pruning.report_rest(self.reporter.objective_curve)
        except Exception as exc:  # noqa: BLE001 - later trials are pruned on fewer curves
            log.warning("job %s: its objective curve did not reach the pruner: %s", self.job_id, exc)

    def write_progress(self) -> JobStatus | None | bool:
        """The job's status; None when this attempt no longer owns it; False when the write failed."""
        r = self.reporter
        try:
            with session_scope() as session:
                status = record_progress(
                    session=session, job_id=self.job_id, epoch=r.epoch, step=r.step, metrics=dict(r.latest),
                    attempt=self.attempt, lease_s=self.lease_s,
                )  # fmt: skip
            if status is not None:  # written: the lease is renewed (or the job already ended)
                self.last_renewed = time.monotonic()
            return status
        except Exception as exc:  # noqa: BLE001 - a missed progress write must not end the job
            log.warning("could not write progress of job %s: %s", self.job_id, exc)
            return False

    def lease_is_fresh(self) -> bool:
        """Renewed within half a lease: no reaper can have given the job to another
        attempt yet. False after the process was frozen (SIGSTOP, a stalled VM) until
        the next renewal says whether the job is still this attempt's."""
        if self.attempt is None or self.lease_s is None:
            return True
        return time.monotonic() - self.last_renewed < self.lease_s / 2

    def store_ready_checkpoint(self) -> None:
        pending, sink = self.reporter.pending_checkpoint, self.reporter.sink
        if pending is None or self.attempt is None:
            return
        if sink is not None and sink.sent + sink.dropped < pending.metrics_needed:
            return  # not yet: a resume from it would miss the metrics still buffered (dropped ones never come)
        if self._storing is not None and self._storing.is_alive():
            return  # the one before is still on its way to the artifact store: this one waits for it
        if not goes_to_store(len(pending.data)):
            self._store(pending)  # into its row: one round trip, on this tick
            return
        # To the artifact store, in a thread of its own: this one keeps renewing the lease and
        # watching for a cancel however long the upload takes (hundreds of MB).
        self._storing = threading.Thread(target=self._store, args=(pending,), daemon=True,
                                         name=f"job-checkpoint-{str(self.job_id)[:8]}")  # fmt: skip
        self._storing.start()

    def _store(self, pending: PendingCheckpoint) -> None:
        assert self.attempt is not None
        try:
            store_checkpoint(job_id=self.job_id, attempt=self.attempt, step=pending.step, epoch=pending.epoch,
                             data=pending.data)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.warning("could not store the checkpoint of job %s: %s", self.job_id, exc)
            return
        if self.reporter.pending_checkpoint is pending:
            self.reporter.pending_checkpoint = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            status = self.write_progress()
            if status in TERMINAL:
                return  # this attempt ended the job itself; the thread is being stopped
            if status is None:
                log.error("job %s: this worker lost its lease; stopping without reporting", self.job_id)
                if self.reporter.sink is not None:
                    self.reporter.sink.revoke()  # before anything else reaches the job's run
                self.reporter.request_stop(StopReason.lease_lost)
                return
            if status == JobStatus.cancelling:
                self.reporter.request_stop(StopReason.cancel)
            if self.deadline is not None and datetime.now(timezone.utc) >= self.deadline:
                self.reporter.request_stop(StopReason.timeout)
            self.store_ready_checkpoint()
            self.check_pruning()

    def check_pruning(self) -> None:
        if self.pruning is None:
            return
        try:
            if self.pruning.should_prune(self.reporter.objective_curve):
                log.info("job %s: pruned by its study (objective behind the others at this point of its schedule)",
                         self.job_id)  # fmt: skip
                self.reporter.request_stop(StopReason.pruned)
        except Exception as exc:  # noqa: BLE001 - a pruning check that fails lets the trial run on
            log.warning("job %s: pruning check failed: %s", self.job_id, exc)
