"""The Celery side that both the API and the worker share: configuration and enqueueing.

The queue only delivers slots: each message names the job it was sent for, but the
worker that receives it runs the fairest queued job, which PostgreSQL picks and claims
with a guarded UPDATE (jobs/repository.py, claim_next_job): the oldest of the project
with the fewest jobs running. One FIFO queue thus serves projects fairly, and a lost or
duplicated message still cannot run a job twice (a message that finds nothing queued
is a no-op). What keeps every queued job served is that the broker holds at least as
many messages as PostgreSQL has queued jobs: one is sent per job created or requeued,
and the reaper sends one more for each that went missing.

Device pools: each pool has its own queue, `<QUEUE_NAME>.<pool>`, which only that pool's
workers consume; a message of it is a slot of that pool (the worker claims the fairest
queued job *of its pool*). The count above holds per pool.
"""

from __future__ import annotations

import uuid
from functools import lru_cache

from celery import Celery

from jobs.pool_names import DEFAULT_POOL
from jobs.settings import settings

RUN_JOB_TASK = "descent.run_job"

# Long GPU jobs: far above any run, so Redis never hands a running task to a second
# worker (celery docs, Redis caveats). The guarded claim makes redelivery harmless anyway.
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def make_celery(name: str = "descent") -> Celery:
    settings.ensure_home()
    app = Celery(name, broker=settings.broker_url)
    app.conf.update(
        # A worker started without -Q consumes its own pool's queue; senders always name one.
        task_default_queue=pool_queue(settings.worker_pool),
        task_ignore_result=True,  # PostgreSQL is the job store, not a result backend
        task_acks_late=True,  # a job whose worker dies before the end is delivered again
        task_reject_on_worker_lost=True,  # ... also when the process was killed (SIGKILL, OOM)
        worker_prefetch_multiplier=1,  # never reserve a job this worker cannot start yet
        # worker_max_tasks_per_child: set by worker/app.py (a fresh process per job with a CUDA build)
        broker_connection_retry_on_startup=True,
        # (The SQLAlchemy transport of the embedded default hands these to create_engine.)
        broker_transport_options=(
            {"visibility_timeout": VISIBILITY_TIMEOUT_S} if settings.broker_url.startswith("redis") else {}
        ),
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        broker_connection_timeout=3,
        # A pool child that started a job while the parent was busy reconnecting to the
        # broker must not be killed for being slow to say it is up (default 4 s): that
        # cost the job an attempt in the fault suite.
        worker_proc_alive_timeout=60,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache(maxsize=1)
def producer() -> Celery:
    return make_celery("descent-producer")


def pool_queue(pool: str) -> str:
    """The Celery queue of a device pool's jobs (README, "Device pools")."""
    return f"{settings.queue_name}.{pool}"


def enqueue_job(job_id: uuid.UUID, pool: str = DEFAULT_POOL) -> None:
    """A slot for the job in its pool's queue (`pool`: the job's, spec.resources.pool)."""
    producer().send_task(RUN_JOB_TASK, args=[str(job_id)], queue=pool_queue(pool))


def ping_broker(timeout_s: float = 2.0) -> None:
    with producer().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)


def queue_depth(pool: str = DEFAULT_POOL) -> int:
    """Messages waiting in a pool's queue (not those a worker has reserved)."""
    return queue_depths([pool])[pool]


def queue_depths(pools: list[str]) -> dict[str, int]:
    """{pool: messages waiting in its queue}, over one broker connection."""
    with producer().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
        # Declaring is idempotent; a passive declare fails on Redis before any worker declared it.
        channel = connection.default_channel
        return {pool: channel.queue_declare(queue=pool_queue(pool)).message_count for pool in pools}
