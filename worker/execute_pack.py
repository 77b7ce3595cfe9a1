"""Running a pack: a study's trials that one worker claimed together, trained as one
computation (trainer/packed.py's PackedTrainer) in this process.

Each trial stays a job: its own JobReporter and JobMonitor (lease heartbeat, progress,
cancel, timeout and pruning checks, checkpoints in the solo format), its own metric sink
and MLflow run, its own end through worker/execute.py's `finish_attempt` / `fail_attempt`
(the one way a job ends, alone or packed). A trial told to stop (pruned, cancelled, timed
out, its lease lost) or diverging leaves the pack alone and is concluded at once, while
the others train on. A worker that dies mid-pack: every trial's lease runs out, the reaper
requeues them, and each resumes alone from its own checkpoint into its own run.

What packs is decided on the specs (jobs/packing.py, and trainer/packed.py's measure of
what is worth packing on this worker's device); only first attempts pack.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from jobs import studies
from jobs.models import Job
from jobs.packing import raw_pack_key
from jobs.repository import Claim, claim_pack_mates
from jobs.settings import settings
from jobs.spec import JobSpec
from jobs.tracking import tracking_client
from trainer.packed import PackedTrainer, not_worthwhile_reason, pack_key, unpackable_reason
from trainer.reporting import TrainingDiverged, TrainingResult
from trainer.speed import release_device_memory
from worker import study_runs
from worker.execute import (
    Outcome, _uploaded_arrays, fail_attempt, finish_attempt, open_metric_sink, prepare_attempt, run_connector,
)
from worker.metrics_sink import MlflowMetricSink
from worker.mlflow_run import RunFacts
from worker.monitor import JobMonitor, JobReporter
from worker.prometheus_metrics import RunningJobGauges, record_outcome
from worker.system_metrics import pack_system_metrics, run_destination

log = logging.getLogger(__name__)

ENDED_POLL_S = 0.2  # how soon a trial that left the pack is concluded (its job row, its run)


def pack_size_of(session: Session, job: Job) -> int:
    """The study's search.pack_size (1: packing off; a job outside a study never packs)."""
    if job.study_id is None:
        return 1
    study = studies.get_study(session=session, study_id=job.study_id)
    return getattr(studies.parse_study(study).search, "pack_size", 1) if study is not None else 1


def claim_mates(*, session: Session, job: Job, attempt: int, worker: str) -> list[Claim]:
    """In the transaction that just claimed `job`: the queued trials of its study that train
    in one pack with it, claimed (up to pack_size - 1 of them); [] when it runs alone.

    A resumed trial (attempt > 1) runs alone: its pack's trials may have stopped at different
    steps, and a pack trains its trials at one step."""
    if attempt != 1 or job.study_id is None:
        return []
    size = pack_size_of(session, job)
    if size <= 1:
        return []
    spec = JobSpec.model_validate(job.spec)
    if unpackable_reason(spec) is not None or not_worthwhile_reason(spec) is not None:
        return []
    key = pack_key(spec)

    def fits(raw: dict[str, Any]) -> bool:
        try:
            return raw_pack_key(raw) == key
        except ValidationError:  # a spec stored before a schema change: not ours to pack
            return False

    _, claims = claim_pack_mates(session=session, job=job, fits=fits, max_size=size - 1, worker=worker,
                                 lease_s=settings.lease_s)  # fmt: skip
    return claims


@dataclass
class PackedTrial:
    job: Job
    attempt: int
    reporter: JobReporter
    monitor: JobMonitor
    spec: JobSpec | None = None
    sink: MlflowMetricSink | None = None
    opened: list[RunFacts] = field(default_factory=list)
    ending: Future | None = None  # its conclusion, once it left the pack
    outcome: Outcome | None = None


def run_pack(claimed: list[tuple[Job, int]]) -> list[Outcome]:
    """Train the claimed trials (job, attempt) as one pack; each one's outcome, in order."""
    started = time.monotonic()
    client = tracking_client()
    pack_id = claimed[0][0].pack_id
    log.info("pack %s: %d trials of study %s", pack_id, len(claimed), claimed[0][0].study_id)
    with ExitStack() as stack:
        trials = []
        for job, attempt in claimed:
            reporter = JobReporter(None, settings.checkpoint_min_interval_s)
            # Each trial's heartbeat covers it to its final transition, as a solo job's does.
            monitor = stack.enter_context(
                JobMonitor(job.id, reporter, settings.progress_interval_s, attempt, settings.lease_s)
            )
            trials.append(PackedTrial(job, attempt, reporter, monitor))
        lead = trials[0].reporter
        stack.enter_context(RunningJobGauges(str(claimed[0][0].id), lambda: lead.step))  # the pack's steps/s
        try:
            _train_pack(client, trials, started)
        finally:
            release_device_memory()
    study_id = claimed[0][0].study_id
    try:  # the next trials start now, not at the reaper's next pass
        study_runs.advance(study_id)
    except Exception:  # noqa: BLE001 - the trials' outcomes stand; the reaper moves the study on
        log.exception("pack %s ended, but its study %s could not be moved on; the reaper will", pack_id, study_id)
    return [t.outcome or Outcome.failed for t in trials]


def _train_pack(client: Any, trials: list[PackedTrial], started: float) -> None:
    ready: list[PackedTrial] = []
    for t in trials:
        try:
            t.spec, _ = prepare_attempt(t.job, t.reporter, t.monitor)  # (image sets do not pack: no dataset dir)
        except Exception as exc:  # noqa: BLE001 - this trial fails alone, before its run is opened
            t.outcome = fail_attempt(client, t.job, t.attempt, t.reporter, None, None, exc)
            record_outcome(t.outcome, time.monotonic() - started)
            continue
        # MLflow down now: the trial trains anyway; its sink opens the run when MLflow is back.
        t.sink = t.reporter.sink = open_metric_sink(client, run_connector(client, t.job, t.spec, t.attempt, t.opened),
                                                    t.monitor, t.spec)
        ready.append(t)
    if not ready:
        return
    try:
        first = ready[0]
        assert first.spec is not None
        trainer = PackedTrainer(
            [t.spec for t in ready], [t.reporter for t in ready],  # type: ignore[misc]
            checkpoint_every_steps=first.spec.checkpoint_every_steps, raw_data=_uploaded_arrays(first.spec, first.job.project),
        )  # fmt: skip
        trainer.setup()
        log.info("pack of %d trials set up in %.2f s", len(ready), time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - the pack cannot be built: each of its trials fails with why
        for t in ready:
            t.outcome = fail_attempt(client, t.job, t.attempt, t.reporter, t.sink, None, exc)
            record_outcome(t.outcome, time.monotonic() - started)
        return
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="pack-trial-end") as pool:

        def conclude_ended(early: bool) -> None:
            """Conclude every trial that left the pack and is not yet being concluded; `early`:
            only those that left before the end (pruned, cancelled, diverged): the pack's
            last system sample still goes to the others' runs."""
            with lock:
                for k, t in enumerate(ready):
                    result = trainer.results[k]
                    left_early = isinstance(result, TrainingDiverged) or getattr(result, "stopped_early", False)
                    if result is not None and t.ending is None and (left_early or not early):
                        t.ending = pool.submit(_end_trial, client, t, result, started, early)

        done = threading.Event()

        def watch() -> None:  # a trial pruned or cancelled mid-pack ends now, not with the pack
            while not done.wait(ENDED_POLL_S):
                conclude_ended(early=True)

        watcher = threading.Thread(target=watch, name="pack-watcher", daemon=True)
        watcher.start()
        # One sampler for the pack: each sample to every trial still in it (a trial that left
        # the pack, pruned or cancelled, is being concluded: its run takes no more).
        system_metrics = pack_system_metrics(client, [
            run_destination(t.sink, t.reporter, t.monitor, still_in=lambda t=t: t.ending is None)  # type: ignore[arg-type]
            for t in ready
        ])  # fmt: skip
        if system_metrics is not None:
            system_metrics.start()
        try:
            try:
                trainer.train()
            finally:
                if system_metrics is not None:  # its last sample into each trial's sink, before they close
                    system_metrics.finish()
        except Exception as exc:  # noqa: BLE001 - the pack's computation failed: every trial still in it fails
            log.exception("pack of %d trials failed", len(ready))
            done.set()
            watcher.join()
            with lock:
                for t in ready:
                    if t.ending is None:
                        t.ending = pool.submit(_fail_trial, client, t, exc, started)
        else:
            done.set()
            watcher.join()
            log.info("pack of %d trials trained at %.2f s", len(ready), time.monotonic() - started)
            trained = []
            for t, result in zip(ready, trainer.results):
                if isinstance(result, TrainingResult) and not result.stopped_early:
                    t.reporter.keep_latest(result.final_metrics)
                    trained.append((Claim(t.job.id, t.attempt), dict(t.reporter.latest)))
            if trained:  # before their ends start (study_runs.trained says why)
                study_runs.trained(ready[0].job.study_id, trained)
            conclude_ended(early=False)
        for t in ready:
            if t.ending is not None:
                t.ending.result()
        log.info("pack of %d trials ended at %.2f s", len(ready), time.monotonic() - started)


def _end_trial(
    client: Any, t: PackedTrial, result: TrainingResult | TrainingDiverged, started: float, early: bool
) -> None:
    """One trial's end, the way a solo job ends (worker/execute.py)."""
    assert t.sink is not None and t.spec is not None
    try:
        if isinstance(result, TrainingDiverged):  # fails alone, as its solo run would
            t.outcome = fail_attempt(client, t.job, t.attempt, t.reporter, t.sink, None, result)
        else:
            # No early model record (worker/early_model.py) for packed trials: a study's next
            # round starts once its trials have trained, so their ends overlap it already, and
            # requests sent while the pack trained slowed it (bench/job_cost.py, the study:
            # 2.6-2.8x its pure training with a record, the spec and shared files sent early,
            # against 2.3-2.4x without).
            t.outcome = finish_attempt(client, t.job, t.spec, t.attempt, t.reporter, t.sink, result, t.opened)
    except Exception:  # noqa: BLE001 - the reaper settles a job whose end could not be written
        log.exception("job %s: its end in the pack could not be recorded", t.job.id)
        t.outcome = Outcome.failed
    record_outcome(t.outcome, time.monotonic() - started)
    if early and t.outcome not in (Outcome.lost, Outcome.skipped) and t.job.study_id is not None:
        try:  # its slot in the study is free now: the next trials may start
            study_runs.advance(t.job.study_id)
        except Exception:  # noqa: BLE001 - the reaper moves the study on
            log.exception("job %s ended, but its study could not be moved on; the reaper will", t.job.id)


def _fail_trial(client: Any, t: PackedTrial, exc: BaseException, started: float) -> None:
    t.outcome = fail_attempt(client, t.job, t.attempt, t.reporter, t.sink, None, exc)
    record_outcome(t.outcome, time.monotonic() - started)


def pack_of(session: Session, claims: list[Claim]) -> list[tuple[Job, int]]:
    """The pack's trials as (job, attempt), read again: their rows now carry the pack id."""
    rows = [(session.get(Job, c.job_id, populate_existing=True), c.attempt) for c in claims]
    return [(row, attempt) for row, attempt in rows if row is not None]
