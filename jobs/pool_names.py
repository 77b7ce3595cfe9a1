"""What a device pool's name may be, said once: the job spec (`resources.pool`) and the
worker's setting (`WORKER_POOL`) both check it. A pool name ends a Celery queue's name
(`<QUEUE_NAME>.<pool>`) and shows in URLs and logs, hence a short slug."""

from __future__ import annotations

DEFAULT_POOL = "default"
POOL_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
POOL_NAME_MAX_LENGTH = 32
