"""The operator's views of a worker, through the real stack: the worker started with
WORKER_METRICS_PORT serves Prometheus /metrics from its main process (the job ran in
a forked child), and every job's MLflow run gets system metrics."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Stack
from tests.integration.test_job_lifecycle import DIGITS_ADAM


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


SUCCEEDED_COUNT = ("descent_worker_job_duration_seconds_count", (("outcome", "succeeded"),))
SUCCEEDED_SUM = ("descent_worker_job_duration_seconds_sum", (("outcome", "succeeded"),))
SUCCEEDED_JOBS = ("descent_worker_jobs_total", (("outcome", "succeeded"),))


def test_the_worker_serves_the_running_jobs_steps_per_second_and_the_finished_jobs_duration(stack: Stack) -> None:
    before = scrape(stack)
    job = stack.submit(DIGITS_ADAM | {"name": "it-worker-metrics", "epochs": 400})
    rate_key = ("descent_worker_job_steps_per_second", (("job_id", job["id"]),))

    # While it runs, its steps/s, measured in the child that runs it, is served by the main process.
    deadline, rates = time.monotonic() + 120, []
    while time.monotonic() < deadline and stack.get(job["id"])["status"] in {"queued", "running"}:
        rate = scrape(stack).get(rate_key)
        if rate:
            rates.append(rate)
            if len(rates) >= 3:
                break
        time.sleep(0.3)
    assert rates and all(r > 1 for r in rates), rates

    done = stack.wait(job["id"])
    assert done["status"] == "succeeded"
    seconds = (datetime.fromisoformat(done["finished_at"]) - datetime.fromisoformat(done["started_at"])).total_seconds()
    # The job is over: its counts stay, its live rate goes (the child that ran it may run the next job).
    deadline = time.monotonic() + 30
    while rate_key in (after := scrape(stack)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rate_key not in after
    assert after[SUCCEEDED_COUNT] - before.get(SUCCEEDED_COUNT, 0) >= 1
    assert after[SUCCEEDED_JOBS] - before.get(SUCCEEDED_JOBS, 0) >= 1
    observed = after[SUCCEEDED_SUM] - before.get(SUCCEEDED_SUM, 0)
    assert observed >= seconds * 0.8, (observed, seconds)  # this job's duration is in the sum
    assert not any(name.startswith("descent_worker_gpu") for name, _ in after)  # no CUDA on this machine


def test_every_run_gets_system_metrics(stack: Stack) -> None:
    job = stack.wait(stack.submit(DIGITS_ADAM | {"name": "it-system-metrics", "epochs": 5})["id"])
    assert job["status"] == "succeeded"
    run_id = job["mlflow"]["run_id"]
    metrics = stack.mlflow.get_run(run_id).data.metrics
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                 "system/system_memory_usage_percentage"):  # fmt: skip
        assert name in metrics, sorted(metrics)
    history = stack.mlflow.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    steps = [point.step for point in history]
    assert steps == sorted(steps) and steps[-1] <= job["progress"]["step"]  # at training steps
