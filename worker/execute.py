"""Running one job, start to end: claim, open (or reopen) the MLflow run, train,
record the outcome. A later attempt of a job whose worker died resumes from its
checkpoint into the same MLflow run.

Celery-free so that tests and tools can run a job in-process; worker/tasks.py
is the thin Celery entry point.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path

import requests
from mlflow.entities import LoggedModel
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs import studies
from jobs.dataset_store import locate_dataset, read_located
from jobs.db import session_scope
from jobs.models import Job, JobCheckpoint, utcnow
from jobs.repository import (
    Claim, claim_next_job, get_job, load_checkpoint, parse_uuid, set_mlflow_run, trained_at_or_marked, transition,
)
from jobs.settings import settings
from jobs.spec import ImageDataset, JobSpec, UploadedDataset
from jobs.states import ACTIVE, JobStatus
from jobs.tracking import drop_unfinished_models, end_run, tracking_client
from trainer.checkpoint import checkpoint_from_bytes
from trainer.data import RawData
from trainer.recipe import Trainer, resolve_device
from trainer.reporting import TrainingResult
from trainer.speed import check_runnable, release_device_memory
from worker import study_runs
from worker.checkpoint_store import read_checkpoint, where_kept
from worker.dataset_cache import ensure_image_set
from worker.early_model import EarlyModelRecord
from worker.metrics_sink import STREAM_POINTS, MetricPoint, MlflowMetricSink
from worker.mlflow_run import (
    RunFacts, latest_steps, log_results, log_run_input, model_link, model_points, open_run, reopen_run, run_params,
    unrecorded_run,
)
from worker.monitor import JobMonitor, JobReporter, StopReason
from worker.prometheus_metrics import RunningJobGauges, record_outcome
from worker.system_metrics import SystemMetricsSampler, job_system_metrics
from worker.trial_pruning import TrialPruning

log = logging.getLogger(__name__)


ACTIVE_IN_ORDER = (JobStatus.running, JobStatus.cancelling)
assert set(ACTIVE_IN_ORDER) == ACTIVE


class Outcome(StrEnum):
    skipped = "skipped"  # not ours to run: a duplicate delivery, or cancelled while queued
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    pruned = "pruned"  # a study's pruner stopped it
    lost = "lost"  # this attempt lost its lease; another attempt carries the job on


def describe_failure(exc: BaseException) -> tuple[str, str]:
    """(error type, message) of a failed job: an exception's own `error_type` when it has one
    (a dataset the worker cannot get is `dataset_unavailable`), else its class name."""
    error_type = getattr(exc, "error_type", None)
    return error_type if isinstance(error_type, str) else type(exc).__name__, str(exc) or repr(exc)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _conclude(
    client: MlflowClient,
    run_id: str | None,
    job_id: uuid.UUID,
    attempt: int,
    outcome: Outcome,
    reporter: JobReporter,
    **values: object,
) -> None:
    """End the MLflow run, then the job: when the job says it is done, so is its run."""
    status = JobStatus(outcome)
    if run_id is not None and attempt > 1:
        _drop_earlier_drafts(client, run_id, job_id)
    if run_id is not None:
        try:
            if outcome == Outcome.pruned:
                client.set_tag(run_id, "descent.pruned", "true")
            end_run(client, run_id, status)
            values["mlflow_run_to_end"] = False
        except Exception:  # noqa: BLE001 - the job's outcome is recorded all the same; the reaper ends the run
            log.exception("could not end MLflow run %s of job %s; the reaper will", run_id, job_id)
    values |= {"epoch": reporter.epoch, "step": reporter.step, "latest_metrics": dict(reporter.latest)}
    if reporter.objective_curve:
        values["objective_curve"] = list(reporter.objective_curve)
    values |= {"lease_until": None}
    with session_scope() as session:
        # running first: the usual case, one UPDATE (a set's order would try cancelling first half the time)
        moved = transition(
            session=session, job_id=job_id, expected=ACTIVE_IN_ORDER, to=status, values=values, attempt=attempt
        )
    if moved is None:
        log.warning("job %s (attempt %d) was no longer this worker's when it ended %s", job_id, attempt, outcome)
    else:
        reporter.concluded = True  # the monitor need not write the job's progress again


def _drop_earlier_drafts(client: MlflowClient, run_id: str, job_id: uuid.UUID) -> None:
    """A resumed attempt's end: the model records an earlier attempt of the job made while it
    trained and never finished (it died) are deleted; this attempt's own is READY by now, or
    it has none."""
    try:
        drop_unfinished_models(client, client.get_run(run_id).info.experiment_id, run_id)
    except Exception as exc:  # noqa: BLE001 - the job's outcome stands; the records stay PENDING
        log.warning("job %s: could not delete the model records earlier attempts left in run %s: %s", job_id, run_id, exc)


def mlflow_unreachable(exc: BaseException) -> bool:
    """A failure of the connection to MLflow (down, restarting, overloaded), as opposed
    to a request MLflow refused or a bug: only the first is worth waiting out."""
    if isinstance(exc, requests.exceptions.RequestException):
        return True
    text = str(exc)
    transport = ("failed with exception", "Max retries exceeded", "Connection refused", "status code 50")
    return isinstance(exc, MlflowException) and any(marker in text for marker in transport)


def _log_results_while_mlflow_returns(
    client: MlflowClient, run_id: str, spec: JobSpec, result: TrainingResult, job_id: uuid.UUID, until: float,
    opened: list[RunFacts], evaluation: Callable[[], list[MetricPoint]] | None = None,
    record: LoggedModel | None = None,
) -> None:
    """The end-of-job artifacts (into the model `record` made while the job trained, if it was).
    MLflow going down now delays the job, it does not fail it: the training is done and its
    metrics are in. Past `until` the job succeeds without them (the reaper ends the run once MLflow is back)."""
    while True:
        try:
            log_results(client, run_id, spec, result, opened[-1] if opened else None, evaluation, record)
            return
        except Exception as exc:
            if not mlflow_unreachable(exc):
                raise
            if time.monotonic() > until:
                log.error("job %s: MLflow unreachable, the spec, confusion matrix and model were not logged: %s",
                          job_id, exc)  # fmt: skip
                return
            log.warning("job %s: MLflow unreachable while logging results, trying again: %s", job_id, exc)
            time.sleep(2.0)


def _linked_by_sink(sink: MlflowMetricSink, spec: JobSpec, record: LoggedModel | None, step: int) -> bool:
    """Whether the sink sends the final model's metrics linked to its record (made while the
    job trained), in the request that carries them anyway: then no request after the sink's
    last one links them (mlflow_run.model_metrics)."""
    if record is None:
        return False
    return sink.link_waiting(model_points(sink.last_points_at(step)), model_link(spec, record.model_id))


def _delivered_points_at(sink: MlflowMetricSink, through: int, step: int) -> list[MetricPoint]:
    """The sink's last points at `step` (the final model's metrics), once the sink has sent
    its first `through` points: a request that carries some of the same points must come
    after the sink's (MlflowMetricSink.wait_delivered says why), and only then does the sink
    know which steps an earlier attempt sent (its points, not this attempt's, are in the run:
    read before, a resumed attempt linked its own as a second point of the same step)."""
    sink.wait_delivered(through, settings.mlflow_wait_at_end_s)  # (gave up: MLflow unreachable)
    return sink.last_points_at(step)


def _uploaded_arrays(spec: JobSpec, project: str) -> RawData | None:
    """An uploaded dataset's arrays, from the database or the artifact store (workers share no filesystem)."""
    if not isinstance(spec.dataset, UploadedDataset):
        return None
    with session_scope() as session:
        located = locate_dataset(session=session, dataset=spec.dataset, project=project)
    arrays = read_located(located)  # large ones from the artifact store, outside the transaction
    return arrays.x, arrays.y, arrays.classes


def execute_job(raw_job_id: str) -> Outcome:
    started = time.monotonic()
    job_id = parse_uuid(raw_job_id)
    if job_id is None:
        log.error("ignoring a message with a malformed job id %r", raw_job_id)
        record_outcome(Outcome.skipped, 0.0)
        return Outcome.skipped
    from worker import execute_pack  # (it builds on this module: imported once a job is claimed)

    pack: list[tuple[Job, int]] = []
    with session_scope() as session:
        # The message is a slot: the fairest queued job runs, not necessarily the one it names.
        claim = claim_next_job(session=session, worker=worker_name(), lease_s=settings.lease_s, pool=settings.worker_pool)
        job_id, attempt = (claim.job_id, claim.attempt) if claim else (job_id, None)
        job = get_job(session=session, job_id=job_id) if attempt else None
        checkpoint = load_checkpoint(session=session, job_id=job_id) if attempt and attempt > 1 else None
        if claim is not None and job is not None:  # a study's trial takes its pack's mates, under the same lock
            mates = execute_pack.claim_mates(session=session, job=job, attempt=claim.attempt, worker=worker_name())
            pack = execute_pack.pack_of(session, [claim, *mates]) if mates else []
    if attempt is None or job is None:
        log.info("message for job %s: no job is queued (a duplicate delivery, or cancelled); nothing to do", job_id)
        record_outcome(Outcome.skipped, time.monotonic() - started)
        return Outcome.skipped
    if pack:  # no mates found: it runs alone, below
        return execute_pack.run_pack(pack)[0]
    reporter = JobReporter(None, settings.checkpoint_min_interval_s)
    # The heartbeat covers the whole attempt, to the final transition: waiting for MLflow
    # to take the last metrics must not look like a dead worker.
    with (
        JobMonitor(job_id, reporter, settings.progress_interval_s, attempt, settings.lease_s) as monitor,
        RunningJobGauges(str(job_id), lambda: reporter.step),
    ):
        try:
            outcome = _run_attempt(job, attempt, checkpoint, reporter, monitor)
        finally:
            release_device_memory()  # all of the job's GPU memory, whatever way it ended
    record_outcome(outcome, time.monotonic() - started)
    if job.study_id is not None and outcome not in (Outcome.lost, Outcome.skipped):
        try:  # the next trials start now, not at the reaper's next pass
            study_runs.advance(job.study_id)
        except Exception:  # noqa: BLE001 - the job's outcome stands; the reaper moves the study on
            log.exception("job %s ended, but its study %s could not be moved on; the reaper will", job_id, job.study_id)
    return outcome


def _follow_trial(job: Job, spec: JobSpec, reporter: JobReporter, monitor: JobMonitor) -> None:
    """A study's trial reports its objective after every epoch, for pruning and the leaderboard."""
    with session_scope() as session:
        row = studies.get_study(session=session, study_id=job.study_id)
        study = studies.parse_study(row)
    reporter.objective, reporter.total_steps = study.objective.metric, spec.total_steps
    if study.pruning.method == "none":
        return  # its reports to Optuna would serve only a pruner (the leaderboard reads the job's curve)
    try:
        monitor.pruning = TrialPruning(job.study_id, study, spec, job.trial_number or 0)
    except Exception as exc:  # noqa: BLE001 - Optuna's storage unreachable: the trial runs unpruned
        log.warning("job %s: pruning unavailable (%s); the trial runs to its end", job.id, exc)


def run_connector(
    client: MlflowClient, job: Job, spec: JobSpec, attempt: int, opened: list[RunFacts]
) -> Callable[[], tuple[str, dict[str, int]]]:
    """The sink's `connect` for this attempt: open the job's MLflow run, or continue an earlier
    attempt's without repeating its steps. `opened` gets the run when this attempt opens it
    (its end need not read it back)."""
    earlier_run = job.mlflow_run_id
    created: list[RunFacts] = []  # the run this attempt made, once it is on the job

    def connect() -> tuple[str, dict[str, int]]:
        nonlocal earlier_run
        if earlier_run is None and attempt > 1 and not created:
            # killed between create_run and recording it, the attempt before left a run only its tags name
            if (found := unrecorded_run(client, spec, job.id, job.project)) is not None:
                with session_scope() as session:
                    set_mlflow_run(session=session, job_id=job.id, experiment_id=found[0], run_id=found[1])
                earlier_run = found[1]
        if earlier_run is not None:
            reopen_run(client, earlier_run, attempt)
            log_run_input(client, earlier_run, spec, job.project)  # the attempt before may have died describing it
            return earlier_run, latest_steps(client, earlier_run)
        if not created:
            tags = study_runs.trial_tags(job, study_runs.ensure_parent_run(client, job.study_id)) if job.study_id else {}
            run = open_run(client, spec, job.id, attempt, job.project, tags, job.submitted_by_key_id)
            # On the job before anything else: killed from here on, the next attempt reopens
            # this run; failing from here on, this attempt's next try describes it again.
            with session_scope() as session:
                set_mlflow_run(session=session, job_id=job.id, experiment_id=run.experiment_id, run_id=run.run_id)
            created.append(run)
        log_run_input(client, created[0].run_id, spec, job.project)
        opened.append(created[0])
        return created[0].run_id, {}

    return connect


def open_metric_sink(client: MlflowClient, connect: Callable[[], tuple[str, dict[str, int]]],
                     monitor: JobMonitor, spec: JobSpec) -> MlflowMetricSink:
    """A job's metric sink: flushed on the settings' cadence, held while the job's lease is
    stale, and held to the per-job metrics rule (METRICS_MAX_POINTS_PER_S). It sends the
    run's params (the spec's) with its first points; until its cadence's first tick, its points
    leave whenever STREAM_POINTS wait (a short job's go while it trains)."""
    return MlflowMetricSink(
        client, connect, settings.metrics_flush_interval_s, settings.metrics_buffer_limit,
        may_send=monitor.lease_is_fresh, max_points_per_s=settings.metrics_max_points_per_s,
        burst_points=settings.metrics_max_points_per_s * settings.metrics_burst_s, params=run_params(spec),
        stream_points=STREAM_POINTS,
    )  # fmt: skip


def prepare_attempt(job: Job, reporter: JobReporter, monitor: JobMonitor) -> tuple[JobSpec, Path | None]:
    """The checks before any run is opened, the job's deadline, a trial's objective and pruning."""
    spec = JobSpec.model_validate(job.spec)
    # A job this worker cannot run (no CUDA; fp16 on a CPU) fails before any run is opened.
    check_runnable(spec.precision, resolve_device(spec.device))
    # So does a standard image set this worker lacks and cannot fetch (dataset_unavailable, in
    # seconds); a download happens here, under the job's lease, never in the trainer.
    datasets_dir = ensure_image_set(spec.dataset.name) if isinstance(spec.dataset, ImageDataset) else None
    if spec.timeout_s:
        monitor.deadline = job.started_at + timedelta(seconds=spec.timeout_s)
    if job.study_id is not None:
        _follow_trial(job, spec, reporter, monitor)
    return spec, datasets_dir


def _run_attempt(
    job: Job, attempt: int, checkpoint: JobCheckpoint | None, reporter: JobReporter, monitor: JobMonitor
) -> Outcome:
    job_id = job.id
    client = tracking_client()
    sink: MlflowMetricSink | None = None
    system_metrics: SystemMetricsSampler | None = None
    early: EarlyModelRecord | None = None
    try:
        spec, datasets_dir = prepare_attempt(job, reporter, monitor)
        opened: list[RunFacts] = []
        # MLflow down now: the job trains anyway; the sink opens the run when MLflow is back.
        sink = reporter.sink = open_metric_sink(client, run_connector(client, job, spec, attempt, opened), monitor, spec)
        if job.study_id is None and settings.log_model:  # (a trial's end overlaps its study's next trials)
            early = EarlyModelRecord(client, sink, opened)  # made while it trains
        # Stopped when the training ends, whatever happens to it: its last sample goes into
        # the sink's buffer then, and to MLflow with the sink's last points.
        system_metrics = job_system_metrics(client, sink, reporter, monitor)
        if system_metrics is not None:
            system_metrics.start()
        try:
            raw_data = _uploaded_arrays(spec, job.project)
            trainer = Trainer(spec, reporter, checkpoint_every_steps=spec.checkpoint_every_steps, raw_data=raw_data,
                              datasets_dir=datasets_dir)  # fmt: skip
            trainer.setup()
            if checkpoint is not None:
                data = read_checkpoint(checkpoint)  # checked against its SHA-256: corrupt fails the job
                log.info("job %s attempt %d resumes from step %d (checkpoint read from %s, %d bytes, SHA-256 "
                         "checked)", job_id, attempt, checkpoint.step, where_kept(checkpoint), len(data))  # fmt: skip
                trainer.load_state_dict(checkpoint_from_bytes(data, trainer.device))
            result: TrainingResult = trainer.train()
        finally:
            if system_metrics is not None:
                system_metrics.finish()
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error, in words
        return fail_attempt(client, job, attempt, reporter, sink, system_metrics, exc, early)
    if job.study_id is not None and not result.stopped_early:  # (stopped early: it ends at once)
        reporter.keep_latest(result.final_metrics)
        study_runs.trained(job.study_id, [(Claim(job_id, attempt), dict(reporter.latest))])
    return finish_attempt(client, job, spec, attempt, reporter, sink, result, opened, system_metrics, early)


def fail_attempt(
    client: MlflowClient, job: Job, attempt: int, reporter: JobReporter, sink: MlflowMetricSink | None,
    system_metrics: SystemMetricsSampler | None, exc: BaseException, early: EarlyModelRecord | None = None,
) -> Outcome:
    """The job failed with `exc`: its last metrics sent (a while), its run and the job ended
    failed, a model record made for it while it trained deleted."""
    log.error("job %s failed", job.id, exc_info=exc)
    if early is not None:
        early.drop()
    if sink is not None:
        sink.close(timeout_s=10)
    if system_metrics is not None:
        system_metrics.wait()
    error_type, message = describe_failure(exc)
    run_id = sink.run_id if sink is not None else job.mlflow_run_id
    _conclude(client, run_id, job.id, attempt, Outcome.failed, reporter, error_type=error_type, error_message=message)
    return Outcome.failed


def finish_attempt(
    client: MlflowClient, job: Job, spec: JobSpec, attempt: int, reporter: JobReporter, sink: MlflowMetricSink,
    result: TrainingResult, opened: list[RunFacts], system_metrics: SystemMetricsSampler | None = None,
    early: EarlyModelRecord | None = None,
) -> Outcome:
    """The one way an attempt that trained ends, alone or in a pack (worker/execute_pack.py):
    its outcome from why the training stopped, its results (into the model record made
    `early`, while it trained, if it was) and last metrics in MLflow, then its run and the
    job concluded."""
    job_id = job.id
    trained_at = utcnow()
    try:
        if reporter.stop_reason == StopReason.lease_lost:
            sink.discard()  # the attempt that owns the job now reports these steps
            if early is not None:
                early.drop()  # (its own model record: the attempt that owns the job makes its own)
            return Outcome.lost  # and ends the MLflow run: this attempt touches nothing more
        reporter.keep_latest(result.final_metrics)
        if result.stopped_early and early is not None:
            early.drop()  # cancelled, pruned or timed out: no model
        if result.stopped_early and reporter.stop_reason == StopReason.timeout:
            raise TimeoutError(f"timed out after {spec.timeout_s:g} s (timeout_s), at step {result.steps}")
        # Every metric is in MLflow before the job says it is done (MLflow down: waits a while),
        # and so are its results; they go while the sink sends the last metrics.
        wait_until = time.monotonic() + settings.mlflow_wait_at_end_s
        record = early.take() if early is not None and not result.stopped_early else None
        evaluation = None  # the model's metrics, linked to it: by the sink, or after the sink has sent them
        if not _linked_by_sink(sink, spec, record, result.steps):
            evaluation = partial(_delivered_points_at, sink, sink.added, result.steps)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-results") as pool:
            results = None
            if not result.stopped_early and sink.run_id is not None:
                results = pool.submit(_log_results_while_mlflow_returns, client, sink.run_id, spec, result, job_id,
                                      wait_until, opened, evaluation, record)  # fmt: skip
            sink.close(timeout_s=settings.mlflow_wait_at_end_s)
            if result.stopped_early:
                outcome = Outcome.pruned if reporter.stop_reason == StopReason.pruned else Outcome.cancelled
            elif sink.run_id is None:
                log.error("job %s trained, but MLflow stayed unreachable: no run, metrics or model recorded", job_id)
                outcome = Outcome.succeeded
            else:
                if results is None:  # the sink opened the run only while sending the last metrics
                    results = pool.submit(_log_results_while_mlflow_returns, client, sink.run_id, spec, result,
                                          job_id, wait_until, opened, evaluation, record)  # fmt: skip
                results.result()
                outcome = Outcome.succeeded
    except Exception as exc:  # noqa: BLE001 - every failure becomes the job's error, in words
        return fail_attempt(client, job, attempt, reporter, sink, system_metrics, exc, early)
    extra: dict[str, object] = {"diagnostics": result.diagnostics} if result.diagnostics else {}
    if outcome == Outcome.succeeded:
        extra["trained_at"] = trained_at_or_marked(trained_at)
    if system_metrics is not None:
        system_metrics.wait()
    _conclude(client, sink.run_id, job_id, attempt, outcome, reporter, **extra)
    return outcome
