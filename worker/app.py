"""The Celery worker application.

Start one worker process per GPU:
  CUDA_VISIBLE_DEVICES=0 WORKER_POOL=gpu celery -A worker.app worker --concurrency=1 --pool=prefork
It consumes its pool's queue, `<QUEUE_NAME>.<WORKER_POOL>` (jobs/queue.py), and says so
in heartbeats (worker/heartbeat.py, a process it starts once ready).
The parent process never touches CUDA (jobs run in forked children), so children can
initialise CUDA themselves. Before it forks, the parent pays the first-use costs that
every job would otherwise pay again in its child (worker/job_processes.py); each child
limits its threads to its share of the cores; with a CUDA build each child runs one job.
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys

from celery import bootsteps
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from jobs.db import get_engine
from jobs.queue import make_celery
from jobs.settings import settings
from worker import heartbeat, job_processes, prometheus_metrics

celery_app = make_celery()
celery_app.conf.include = ["worker.tasks"]
# Replaces the queue's setting of one job per child; the command line still wins.
celery_app.conf.worker_max_tasks_per_child = 1 if job_processes.children_run_one_job_each() else None

# Threads of each job, set by the parent at start (its concurrency is known then) and
# inherited by the children it forks.
_threads_per_job = 1
_concurrency = 1
_heartbeat: subprocess.Popen | None = None
_worker_name = ""
_stopping = False  # the worker is shutting down: its heartbeat process is not started again
# How long the parent waits for its first heartbeat to be recorded before it says it is
# ready (then a job for its pool is accepted at once); the database down: it goes on without.
FIRST_HEARTBEAT_WAIT_S = 30.0


@worker_process_init.connect
def _prepare_child(**_: object) -> None:
    # The pool was copied by fork: drop the parent's connections without closing them.
    get_engine().dispose(close=False)
    logging.getLogger("worker").setLevel(logging.INFO)
    job_processes.limit_job_threads(_threads_per_job)
    logging.getLogger("worker").info(
        "jobs of this process: %d torch/BLAS thread(s), %s", _threads_per_job,
        "one job (CUDA build)" if job_processes.children_run_one_job_each() else "one after another",
    )  # fmt: skip


@worker_init.connect
def _prepare_children(sender: object, **_: object) -> None:
    global _threads_per_job, _concurrency
    concurrency = getattr(sender, "concurrency", None)
    if not isinstance(concurrency, int):  # --concurrency=auto, resolved after this signal: a job per core
        concurrency = job_processes.cores_available()
    _concurrency = concurrency
    _threads_per_job = job_processes.threads_per_job(concurrency)
    job_processes.warm_up_for_children()


@worker_init.connect
def _serve_worker_metrics(**_: object) -> None:
    # In the main process, before the pool forks: the children inherit the metrics directory.
    if settings.worker_metrics_port:
        prometheus_metrics.start_exporter(settings.worker_metrics_port, settings.worker_metrics_host)


def _heartbeat_command(again: bool) -> list[str]:
    command = [sys.executable, "-m", "worker.heartbeat", _worker_name, settings.worker_pool, str(_concurrency),
               str(os.getpid())]  # fmt: skip
    return [*command, heartbeat.AGAIN] if again else command


@worker_ready.connect
def _start_heartbeats(sender: object, **_: object) -> None:
    """Celery logs "<name> ready." after this returns: by then the first heartbeat is recorded."""
    global _heartbeat, _worker_name
    if _heartbeat is not None and _heartbeat.poll() is None:
        return  # ready again after a broker reconnection: it is beating already
    _worker_name = str(getattr(sender, "hostname", None) or f"worker@{os.uname().nodename}")
    _heartbeat = subprocess.Popen(_heartbeat_command(again=False), stdout=subprocess.PIPE, text=True)
    readable, _, _ = select.select([_heartbeat.stdout], [], [], FIRST_HEARTBEAT_WAIT_S)
    said = _heartbeat.stdout.readline().strip() if readable else ""
    _heartbeat.stdout.close()
    if said != heartbeat.REGISTERED:
        logging.getLogger("worker").warning("first heartbeat of %s not recorded yet; the pool's jobs still run",
                                            _worker_name)  # fmt: skip


def keep_heartbeating() -> None:
    """The heartbeat process ended while the worker runs on (killed, out of memory): start
    another, or the worker would show as gone and its pool's jobs would say no one serves it."""
    global _heartbeat
    if _stopping or _heartbeat is None or _heartbeat.poll() is None:
        return
    logging.getLogger("worker").warning(
        "the heartbeat process of %s ended (exit code %s); starting another", _worker_name, _heartbeat.returncode
    )
    _heartbeat = subprocess.Popen(_heartbeat_command(again=True), stdout=subprocess.DEVNULL)


class HeartbeatKeeper(bootsteps.StartStopStep):
    """Checks the heartbeat process every heartbeat interval on the worker's own timer (in
    the parent's event loop: no thread of ours in a process that forks job processes)."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: object, **kwargs: object) -> None:
        super().__init__(worker, **kwargs)
        self.timer_entry = None

    def start(self, worker: object) -> None:
        self.timer_entry = worker.timer.call_repeatedly(settings.worker_heartbeat_interval_s, keep_heartbeating)

    def stop(self, worker: object) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None


celery_app.steps["worker"].add(HeartbeatKeeper)


@worker_shutdown.connect
def _stop_heartbeats(**_: object) -> None:
    global _stopping
    _stopping = True
    if _heartbeat is not None and _heartbeat.poll() is None:
        _heartbeat.terminate()  # it marks the worker stopped
        try:
            _heartbeat.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _heartbeat.kill()


@worker_process_shutdown.connect
def _drop_live_gauges(pid: int, **_: object) -> None:
    prometheus_metrics.mark_child_dead(pid)


@worker_shutdown.connect
def _remove_metrics_directory(**_: object) -> None:
    if settings.worker_metrics_port:
        prometheus_metrics.remove_directory()
