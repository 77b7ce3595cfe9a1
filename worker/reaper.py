"""The recovery loop: `python -m worker.reaper`.

PostgreSQL, not the broker, decides what runs. Every `reaper_interval_s` this
process (one or several: rows are taken with SKIP LOCKED):
- requeues active jobs whose worker stopped renewing its lease (killed, OOM,
  machine gone): the next attempt resumes from the checkpoint; after
  `max_attempts` the job fails with "worker lost";
- ends the MLflow runs that finished jobs left RUNNING (the job failed above,
  was cancelled while queued, or ended while MLflow was down);
- moves running studies on (a worker that died between ending a trial and starting
  the next) and writes the MLflow report of ended studies that still lack one;
- deletes the rows of workers long gone (jobs/pools.py: each pool keeps its latest);
- in a thread of its own, deletes objects in the artifact store that no row points to
  (worker/artifact_sweeper.py, every `artifact_sweep_interval_s`);
- enqueues again queued jobs nobody claimed for `unclaimed_requeue_s` (the
  broker lost the message, or was down when the job was submitted), as many as
  PostgreSQL has queued jobs beyond the messages the broker holds. A message is a
  slot (jobs/queue.py): whichever job it names, the worker runs the fairest queued
  one, so what matters is that messages are at least as many as queued jobs.

A process of its own, not a thread in the Celery parent: that parent forks a
child per job, and a fork while another thread holds a lock can hang the child.
"""

from __future__ import annotations

import logging
import signal
import threading

from sqlalchemy.orm import Session

from jobs import study_search
from jobs.db import session_scope
from jobs.pools import prune_gone_workers
from jobs.queue import enqueue_job, queue_depths
from jobs.repository import claim_unclaimed, mark_run_ended, queued_by_pool, reap_lost_jobs, runs_to_end
from jobs.settings import settings
from jobs.states import JobStatus
from jobs.studies import running_study_ids, studies_to_report
from worker import study_runs
from worker.artifact_sweeper import start_sweeping
from jobs.tracking import drop_unfinished_models, end_run, tracking_client

log = logging.getLogger("worker.reaper")


def recover_once() -> tuple[int, int]:
    """One pass; (jobs reaped, jobs enqueued again)."""
    with session_scope() as session:
        reaped = reap_lost_jobs(session=session)
        # Runs end before the jobs' new states are committed: whoever sees a job failed
        # sees its run FAILED (unless MLflow is down; then a later pass ends it).
        end_open_runs(session)
    for job in reaped:
        log.warning("job %s: worker lost -> %s", job.job_id, job.status)
        if job.status == JobStatus.queued:
            try:
                enqueue_job(job.job_id, job.pool)  # back to its own pool's queue
            except Exception as exc:  # noqa: BLE001 - still queued: the unclaimed sweep sends it later
                log.warning("could not enqueue job %s: %s", job.job_id, exc)
    move_studies_on()
    with session_scope() as session:  # (after the recovery: housekeeping never holds it up)
        prune_gone_workers(session=session)
    return len(reaped), resend_lost_messages()


def resend_lost_messages() -> int:
    """Per pool, messages lost = queued jobs in PostgreSQL - messages in the pool's queue.
    Re-sending only that many keeps a long, healthy backlog (or a pool whose workers are
    all gone) from filling the broker with duplicates. Returns the messages sent."""
    with session_scope() as session:
        queued = queued_by_pool(session=session)
    if not queued:
        return 0
    try:
        depths = queue_depths(sorted(queued))
    except Exception as exc:  # noqa: BLE001 - broker down: nothing can be sent this pass anyway
        log.info("broker unreachable (%s); queued jobs wait for it", exc)
        return 0
    sent = 0
    for pool, count in sorted(queued.items()):
        with session_scope() as session:
            unclaimed = claim_unclaimed(session=session, older_than_s=settings.unclaimed_requeue_s,
                                        limit=count - depths[pool], pool=pool)  # fmt: skip
        for job_id in unclaimed:
            try:
                enqueue_job(job_id, pool)
                sent += 1
            except Exception as exc:  # noqa: BLE001 - the broker is down: the next pass tries again
                log.warning("could not enqueue unclaimed job %s: %s", job_id, exc)
                return sent
    return sent


def move_studies_on() -> None:
    """Each running study advanced once (a no-op unless a trial ended unseen), then the
    reports that are due. A failure here never stops the job recovery above."""
    try:
        with session_scope() as session:
            running = running_study_ids(session=session)
        for study_id in running:  # reports below: one MLflow outage costs one failed try per pass
            study_runs.advance(study_id, report=False)
        with session_scope() as session:
            due = studies_to_report(session=session)
        for study_id in due:
            if not study_runs.write_report(study_id):
                break  # MLflow down: the others would fail the same way
    except Exception:  # noqa: BLE001
        log.exception("moving studies on failed; the next pass tries again")


def end_open_runs(session: Session) -> int:
    """End the MLflow runs of finished jobs that are still RUNNING: jobs this pass
    failed, jobs cancelled while queued, jobs that ended while MLflow was down.
    Rows stay locked while their run is ended, so that a second reaper does not
    end it twice; a run MLflow cannot end now keeps its flag for the next pass. The model
    records its job's attempts made while they trained and never finished (PENDING: the
    worker died, or MLflow went away at the job's end) are deleted with it."""
    ended = 0
    for job_id, run_id, experiment_id, status in runs_to_end(session=session):
        try:
            client = tracking_client()
            if experiment_id is not None:
                drop_unfinished_models(client, experiment_id, run_id)
            end_run(client, run_id, status)
        except Exception as exc:  # noqa: BLE001 - MLflow down: the next pass tries again
            log.info("could not end MLflow run %s of job %s yet: %s", run_id, job_id, exc)
            break  # the others would fail the same way
        mark_run_ended(session=session, job_id=job_id)
        ended += 1
    return ended


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Its first study move would otherwise build the Optuna storage (0.1-0.5 s measured here)
    # while it holds the study's row lock, and the worker ending that study's trial waits.
    study_search.warm_storage()
    start_sweeping(stop)
    log.info("reaper ready: every %.1f s, lease %.1f s", settings.reaper_interval_s, settings.lease_s)
    while not stop.wait(settings.reaper_interval_s):
        try:
            recover_once()
        except Exception:  # noqa: BLE001 - a database outage must not end the loop
            log.exception("recovery pass failed; trying again in %.1f s", settings.reaper_interval_s)


if __name__ == "__main__":
    main()
