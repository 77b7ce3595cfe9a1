"""The Celery worker application.

Start one worker process per GPU:
  CUDA_VISIBLE_DEVICES=0 celery -A worker.app worker --concurrency=1 --pool=prefork
The parent process never touches CUDA (jobs run in forked children, one job per
child), so children can initialise CUDA themselves.
"""

from __future__ import annotations

import logging

from celery.signals import worker_process_init

from jobs.db import get_engine
from jobs.queue import make_celery

celery_app = make_celery()
celery_app.conf.include = ["worker.tasks"]


@worker_process_init.connect
def _fresh_connections_in_child(**_: object) -> None:
    # The pool was copied by fork: drop the parent's connections without closing them.
    get_engine().dispose(close=False)
    logging.getLogger("worker").setLevel(logging.INFO)
