"""Live job events: state transitions and progress, published after they are committed,
read by the API's Server-Sent Events endpoint.

One Redis stream per job (`descent:job:<id>:events`). A stream, not pub/sub: each
entry has an id that a reconnecting client sends back as Last-Event-ID and reads on
from there without a gap, and a reader blocks in XREAD instead of polling anything.

Events are published from a SQLAlchemy `after_commit` hook: a repository function
that changes a job stages its event on the session, and it goes out only once the
change is committed (a rolled-back change publishes nothing). Publishing never fails
the caller: with Redis down the event is dropped (the stream's reader still gets the
job's state from PostgreSQL when it connects), and publishing pauses for a few
seconds, so that a down Redis costs the API and the workers no time.

Without Redis (the embedded default's SQLite broker) there is no stream; the API then
follows a job by reading its row once a second (see api/routes/events.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from functools import lru_cache
from typing import Any

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session

from jobs.settings import settings

log = logging.getLogger(__name__)

STREAM_MAXLEN = 5000  # entries kept per job (approximate trimming); a job's progress comes at ~2/s
STREAM_TTL_S = 7 * 24 * 3600  # a finished job's stream is kept this long for late readers
PAUSE_AFTER_FAILURE_S = 5.0
_STAGED = "descent.events"


def stream_key(job_id: uuid.UUID | str) -> str:
    return f"descent:job:{job_id}:events"


def study_stream_key(study_id: uuid.UUID | str) -> str:
    """A study's stream: its own state changes and every state change of its trials."""
    return f"descent:study:{study_id}:events"


def events_enabled() -> bool:
    return bool(settings.events_url)


@lru_cache(maxsize=1)
def _client() -> redis.Redis:
    # Short timeouts: publishing happens on request and monitor threads.
    return redis.Redis.from_url(settings.events_url, socket_connect_timeout=1, socket_timeout=1)


_paused_until = 0.0


def publish(key: str, kind: str, data: dict[str, Any], final: bool = False) -> str | None:
    """Append one event to a stream now (`stream_key(job_id)`, `study_stream_key(id)`);
    its id, or None when it could not be sent."""
    global _paused_until
    if not events_enabled() or time.monotonic() < _paused_until:
        return None
    try:
        pipe = _client().pipeline(transaction=False)
        pipe.xadd(key, {"kind": kind, "data": json.dumps(data, default=str)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(key, STREAM_TTL_S if final else 30 * 24 * 3600)
        entry_id, _ = pipe.execute()
    except redis.RedisError as exc:
        _paused_until = time.monotonic() + PAUSE_AFTER_FAILURE_S
        log.warning("could not publish a %s event to %s (%s); pausing events for %.0f s",
                    kind, key, type(exc).__name__, PAUSE_AFTER_FAILURE_S)  # fmt: skip
        return None
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def stage(session: Session, job_id: uuid.UUID, kind: str, data: dict[str, Any], final: bool = False) -> None:
    """Publish this event of a job once the session's transaction commits."""
    stage_to(session, stream_key(job_id), kind, data, final)


def stage_to(session: Session, key: str, kind: str, data: dict[str, Any], final: bool = False) -> None:
    """Publish this event to stream `key` once the session's transaction commits."""
    if events_enabled():
        session.info.setdefault(_STAGED, []).append((key, kind, data, final))


@event.listens_for(Session, "after_commit")
def _publish_staged(session: Session) -> None:
    for key, kind, data, final in session.info.pop(_STAGED, []):
        publish(key, kind, data, final)


@event.listens_for(Session, "after_rollback")
def _drop_staged(session: Session) -> None:
    session.info.pop(_STAGED, None)
