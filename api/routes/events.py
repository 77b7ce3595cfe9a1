"""GET /v1/jobs/{id}/events: a job's life as Server-Sent Events.

A new connection first gets a `snapshot` (the job as GET /v1/jobs/{id} shows it),
then every `state` and `progress` event as the worker, the reaper or the API publish
it (jobs/events.py), read with a blocking XREAD on the job's Redis stream. Each event
carries its stream id; a client that reconnects with `Last-Event-ID` gets what it
missed, in order, and no snapshot. When the job has ended the stream sends the final
`state` and closes. Every 15 s of silence a comment line keeps proxies from closing
the connection, and the job's row is looked at once, in case its final event was
lost while Redis was down.

Without Redis (the embedded SQLite broker) the job's row is read once a second and
its changes are sent; ids are then not resumable and a reconnect starts over with a
snapshot (as does a Last-Event-ID that is not one of the stream's ids).

A stream holds no database connection between reads: the key is checked and the
job loaded in short sessions of their own (api/deps.py), and each later look at the
job opens and closes one. Each key may hold MAX_STREAMS_PER_KEY streams at once
(api/admission.py); one more is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import anyio
import redis.asyncio as aioredis
from fastapi import APIRouter, Header, HTTPException, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.admission import Refused, StreamSlot, acquire_stream_slot
from api.deps import CallerDep, too_many_requests
from api.schemas import AUTH_RESPONSES, JobPublic, Problem
from jobs import repository
from jobs.access import Caller
from jobs.db import session_factory
from jobs.events import events_enabled, stream_key
from jobs.settings import settings
from jobs.states import TERMINAL

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTH_RESPONSES)
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {"model": Problem, "description": "The key already holds MAX_STREAMS_PER_KEY open streams, or this "
          "address sent too many invalid keys (Retry-After)."}
}

KEEPALIVE_S = 15.0
POLL_WITHOUT_REDIS_S = 1.0
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")  # a Redis stream entry id


def sse(kind: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    lines = [f"event: {kind}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, default=str, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()


def _read_job(caller: Caller, job_id: str) -> JobPublic | None:
    parsed = repository.parse_uuid(job_id)
    if parsed is None:
        return None
    with session_factory()() as session:
        job = repository.get_job(session=session, job_id=parsed, project=caller.project)
        return JobPublic.from_row(job) if job is not None else None


def _final_state(job: JobPublic) -> dict[str, Any]:
    error = job.error.model_dump() if job.error else None
    return {"status": job.status, "final": True, "error": error, "metrics": job.metrics.model_dump(),
            "progress": job.progress.model_dump(), "finished_at": job.finished_at}  # fmt: skip


@dataclass(frozen=True)
class Followed:
    """What a stream follows (a job, a study): its Redis stream, how to read it now, when
    it has ended, and what its final `state` event says."""

    key: str
    read: Callable[[], Any]  # (sync) the object as GET shows it, or None when gone
    ended: Callable[[Any], bool]
    final_state: Callable[[Any], dict[str, Any]]


async def follow_stream(followed: Followed, last_event_id: str | None) -> AsyncIterator[bytes]:
    # The read timeout must outlast the blocking XREAD (redis-py 8 defaults it to 5 s, which
    # cut streams whenever a job went quiet for 5 s, e.g. while its model was logged).
    client = aioredis.Redis.from_url(settings.events_url, socket_connect_timeout=3, socket_timeout=KEEPALIVE_S + 10)
    key = followed.key
    try:
        if last_event_id is None:
            # The stream's position first, then the snapshot: whatever happens after the
            # snapshot was read is at a later id, so nothing falls between the two.
            latest = await client.xrevrange(key, count=1)
            position = latest[0][0].decode() if latest else "0-0"
            current = await run_in_threadpool(followed.read)
            if current is None:
                return
            yield sse("snapshot", current.model_dump(mode="json"), position)
            if followed.ended(current):
                yield sse("state", followed.final_state(current), position)
                return
        else:
            position = last_event_id
        while True:
            entries = await client.xread({key: position}, block=int(KEEPALIVE_S * 1000), count=100)
            if not entries:
                yield b": keep-alive\n\n"
                current = await run_in_threadpool(followed.read)
                if current is None or followed.ended(current):  # its final event never came
                    if current is not None:
                        yield sse("state", followed.final_state(current), position)
                    return
                continue
            for entry_id, fields in entries[0][1]:
                position = entry_id.decode()
                kind = fields[b"kind"].decode()
                data = json.loads(fields[b"data"])
                if kind == "state" and data.get("final", data.get("status") in TERMINAL):
                    current = await run_in_threadpool(followed.read)
                    yield sse("state", followed.final_state(current) if current else data | {"final": True}, position)
                    return
                yield sse(kind, data, position)
    finally:
        await client.aclose()


async def _from_database(caller: Caller, job: JobPublic) -> AsyncIterator[bytes]:
    """No Redis: the job's row, looked at once a second; an event whenever it changed."""
    yield sse("snapshot", job.model_dump(mode="json"))
    last_status, last_step = job.status, job.progress.step
    polls = 0
    while job.status not in TERMINAL:
        await asyncio.sleep(POLL_WITHOUT_REDIS_S)
        polls += 1
        if polls % int(KEEPALIVE_S / POLL_WITHOUT_REDIS_S) == 0:
            yield b": keep-alive\n\n"
        current = await run_in_threadpool(_read_job, caller, str(job.id))
        if current is None:
            return
        job = current
        if job.status != last_status and job.status not in TERMINAL:
            yield sse("state", {"status": job.status, "from": last_status})
        if job.progress.step != last_step:
            yield sse("progress", job.progress.model_dump() | {"metrics": job.metrics.model_dump()})
        last_status, last_step = job.status, job.progress.step
    yield sse("state", _final_state(job))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "snapshot, then state and progress events"},
        404: {"model": Problem, "description": "No job with this id in the caller's project."},
        **STREAM_RESPONSES,
    },
)
async def job_events(
    job_id: str,
    caller: CallerDep,
    # Typed `str` with a None default, not `str | None`: the schema then says "an optional
    # string", not "a string or null", which clients would have to send as the text "null".
    last_event_id: Annotated[
        str,
        Header(alias="Last-Event-ID", max_length=100, description="Resume after this event (its `id:` line)."),
    ] = None,  # type: ignore[assignment]
) -> StreamingResponse:
    """The job's state changes and progress (epoch, step, fraction, ETA, latest metrics),
    live, a few per second at most; closes after the job's final state."""
    job = await run_in_threadpool(_read_job, caller, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
        last_event_id = None  # not an id this stream gave out (or from the no-Redis mode): start over
    followed = Followed(stream_key(job.id), partial(_read_job, caller, str(job.id)),
                        lambda j: j.status in TERMINAL, _final_state)  # fmt: skip
    stream = follow_stream(followed, last_event_id) if events_enabled() else _from_database(caller, job)
    return await event_stream_response(caller, stream)


async def event_stream_response(caller: Caller, stream: AsyncIterator[bytes]) -> StreamingResponse:
    """The stream as an SSE response, holding one of the key's stream slots while it runs;
    429 when the key holds all of them."""
    try:
        slot = await run_in_threadpool(acquire_stream_slot, caller)
    except Refused as refused:
        raise too_many_requests(refused) from None
    return StreamingResponse(
        _holding(slot, stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # nginx: do not buffer
    )


async def _holding(slot: StreamSlot, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            slot.renew_if_due()  # at least every KEEPALIVE_S something passes here
            yield chunk
    finally:
        # Released first and synchronously: a client that went away cancels this task,
        # and under cancellation every await here would be interrupted.
        slot.release()
        with anyio.CancelScope(shield=True):
            await stream.aclose()  # type: ignore[attr-defined]

