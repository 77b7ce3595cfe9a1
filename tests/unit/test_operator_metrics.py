"""GET /metrics: Prometheus text for a server-admin key, counting from PostgreSQL and the broker."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_prometheus_metrics_count_jobs_by_status_and_time_submissions(client: TestClient) -> None:
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401  # it counts every project
    before = client.get("/metrics")  # the client's key: the bootstrap key, a server admin
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")

    def value(text: str, name: str) -> float:
        [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")]
        return float(line.rsplit(" ", 1)[1])

    job = client.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 2}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    after = client.get("/metrics").text
    cancelled = 'descent_jobs{status="cancelled"}'
    assert value(after, cancelled) == value(before.text, cancelled) + 1
    assert value(after, "descent_job_submission_seconds_count") == value(
        before.text, "descent_job_submission_seconds_count"
    ) + 1
    assert value(after, "descent_queue_depth") >= 0
