"""GET /v1/jobs/{id}/events without Redis (the embedded default): the job's row is
followed and its changes are sent as Server-Sent Events until its final state.
The Redis-stream path, with Last-Event-ID resume, is tested in tests/integration."""

from __future__ import annotations

import threading
import time
import uuid

from fastapi.testclient import TestClient

from descent.client import parse_sse
from jobs import repository
from jobs.db import session_scope
from jobs.events import events_enabled
from jobs.states import JobStatus


def parse(body: str) -> list[tuple[str, dict]]:
    return [(event["event"], event["data"]) for event in parse_sse(iter(body.splitlines()))]


def run_job_in_background(job_id: uuid.UUID) -> threading.Thread:
    """What a worker does to the row: claim it, report progress twice, succeed."""

    def work() -> None:
        time.sleep(0.3)
        with session_scope() as session:
            attempt = repository.claim_job(session=session, job_id=job_id, worker="unit:1")
        for step in (5, 10):
            time.sleep(1.2)
            with session_scope() as session:
                repository.record_progress(session=session, job_id=job_id, epoch=1, step=step,
                                           metrics={"train_loss": 1.0 / step}, attempt=attempt)  # fmt: skip
        time.sleep(1.2)
        with session_scope() as session:
            repository.transition(session=session, job_id=job_id, expected=[JobStatus.running],
                                  to=JobStatus.succeeded, values={"latest_metrics": {"val_accuracy": 0.9}})  # fmt: skip

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_without_redis_the_row_is_followed_to_the_end(client: TestClient) -> None:
    assert not events_enabled()  # the unit suite's broker is SQLite
    job = client.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 2, "batch_size": 16}).json()
    worker = run_job_in_background(uuid.UUID(job["id"]))
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse(response.read().decode())
    worker.join()
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "snapshot" and events[0][1]["status"] == "queued"
    assert ("state", {"status": "running", "from": "queued"}) in events
    steps = [data["step"] for kind, data in events if kind == "progress"]
    assert steps == [5, 10]
    assert kinds[-1] == "state" and events[-1][1]["status"] == "succeeded" and events[-1][1]["final"] is True
    assert events[-1][1]["metrics"]["val_accuracy"] == 0.9


def test_a_finished_job_sends_snapshot_and_final_state(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 2}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    response = client.get(f"/v1/jobs/{job['id']}/events")
    assert [(k, d["status"]) for k, d in parse(response.text)] == [("snapshot", "cancelled"), ("state", "cancelled")]


def test_unknown_jobs_are_404_and_foreign_resume_ids_start_over(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/events").status_code == 404
    assert client.get("/v1/jobs/not-an-id/events").status_code == 404
    job = client.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 2}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    # An id the stream never gave out: start over, with a snapshot.
    restarted = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert restarted.status_code == 200 and parse(restarted.text)[0][0] == "snapshot"
    too_long = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "1" * 101})
    assert too_long.status_code == 422 and too_long.json()["detail"][0]["field"] == "Last-Event-ID"

