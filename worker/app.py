"""The Celery worker application.

Start one worker process per GPU:
  CUDA_VISIBLE_DEVICES=0 celery -A worker.app worker --concurrency=1 --pool=prefork
The parent process never touches CUDA (jobs run in forked children, one job per
child), so children can initialise CUDA themselves.
"""

from __future__ import annotations

import logging

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from jobs.db import get_engine
from jobs.queue import make_celery
from jobs.settings import settings
from worker import prometheus_metrics

celery_app = make_celery()
celery_app.conf.include = ["worker.tasks"]


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # The pool was copied by fork: drop the parent's connections without closing them.
    get_engine().dispose(close=False)
    logging.getLogger("worker").setLevel(logging.INFO)


@worker_init.connect
def _serve_worker_metrics(**_: object) -> None:
    # In the main process, before the pool forks: the children inherit the metrics directory.
    if settings.worker_metrics_port:
        prometheus_metrics.start_exporter(settings.worker_metrics_port, settings.worker_metrics_host)


@worker_process_shutdown.connect
def _drop_live_gauges(pid: int, **_: object) -> None:
    prometheus_metrics.mark_child_dead(pid)


@worker_shutdown.connect
def _remove_metrics_directory(**_: object) -> None:
    if settings.worker_metrics_port:
        prometheus_metrics.remove_directory()
