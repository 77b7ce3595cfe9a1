"""GET /v1/jobs/{id}/events through the real stack: the worker publishes to a Redis
stream, the API relays it as Server-Sent Events, and a client that drops the
connection and comes back with Last-Event-ID misses nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import redis

from descent.client import parse_sse
from jobs.events import stream_key
from tests.integration.conftest import Stack
from tests.integration.test_job_lifecycle import DIGITS_ADAM


def read_events(response: httpx.Response) -> Iterator[dict]:
    """{"event", "id", "data"} dicts, parsed by the descent client's SSE reader."""
    return parse_sse(response.iter_lines())


def as_tuple(stream_id: str) -> tuple[int, int]:
    ms, seq = stream_id.split("-")
    return int(ms), int(seq)


def test_a_live_stream_resumes_without_gaps_and_closes_with_the_final_state(stack: Stack) -> None:
    job = stack.submit(DIGITS_ADAM | {"name": "it-events", "epochs": 400})
    url = f"/v1/jobs/{job['id']}/events"

    first: list[dict] = []
    with stack.api.stream("GET", url, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            first.append(event)
            if sum(e["event"] == "progress" for e in first) >= 3:
                break  # the client goes away mid-job
    assert first[0]["event"] == "snapshot" and first[0]["data"]["id"] == job["id"]

    time.sleep(1.5)  # events go on while nobody listens
    resumed: list[dict] = []
    with stack.api.stream("GET", url, headers={"Last-Event-ID": first[-1]["id"]}, timeout=120) as response:
        assert response.status_code == 200
        resumed = list(read_events(response))  # runs until the server closes the stream

    # No snapshot on resume; the stream ends with the job's final state.
    assert resumed and all(e["event"] in {"state", "progress"} for e in resumed)
    final = resumed[-1]
    assert final["event"] == "state" and final["data"]["final"] is True
    assert final["data"]["status"] == "succeeded" and final["data"]["metrics"]["val_accuracy"] > 0.9

    # Every event published after the snapshot, exactly once, in order: compare with the stream itself.
    received = [e["id"] for e in first[1:] + resumed]
    published = [i.decode() for i, _ in redis.Redis.from_url(stack.settings.events_url).xrange(stream_key(job["id"]))]
    after_snapshot = [i for i in published if as_tuple(i) > as_tuple(first[0]["id"])]
    assert received == after_snapshot, "events were lost or repeated across the reconnect"

    kinds = [e["event"] for e in first[1:] + resumed]
    states = [e["data"]["status"] for e in first + resumed if e["event"] == "state"]
    assert "running" in states or first[0]["data"]["status"] == "running"
    progress = [e["data"] for e in first + resumed if e["event"] == "progress"]
    assert [p["step"] for p in progress] == sorted(p["step"] for p in progress)
    assert all(0.0 <= p["fraction"] <= 1.0 for p in progress)
    assert "train_loss" in progress[-1]["metrics"]  # the latest metrics ride along (none before the first step)
    assert any(p["eta_s"] is not None for p in progress)
    # A few per second at most: the worker publishes on its progress heartbeat.
    done = stack.get(job["id"])
    seconds = (datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])).total_seconds()
    assert kinds.count("progress") <= 3 * seconds + 5, (kinds.count("progress"), seconds)


def test_a_finished_jobs_stream_sends_its_final_state_and_closes(stack: Stack) -> None:
    job = stack.wait(stack.submit(DIGITS_ADAM | {"name": "it-events-done", "epochs": 3})["id"])
    with stack.api.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=30) as response:
        events = list(read_events(response))
    assert [e["event"] for e in events] == ["snapshot", "state"]
    assert events[1]["data"]["final"] is True and events[1]["data"]["status"] == "succeeded"


def test_another_projects_key_cannot_follow_the_job(stack: Stack) -> None:
    job = stack.submit(DIGITS_ADAM | {"name": "it-events-private", "epochs": 3})
    project = stack.api.post("/v1/projects", json={"name": f"events-{job['id'][:8]}"}).json()["name"]
    other = stack.api.post(f"/v1/projects/{project}/keys", json={}).json()["key"]
    response = stack.api.get(f"/v1/jobs/{job['id']}/events", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404
