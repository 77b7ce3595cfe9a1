"""MLflow down, at a job's start or in its middle: the job trains on, its metrics wait
in the worker's buffer, and when MLflow is back every step arrives exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from launcher.processes import mlflow_command, wait_http
from tests.integration.conftest import Stack
from tests.integration.test_job_lifecycle import DIGITS_ADAM


@contextmanager
def mlflow_down(stack: Stack) -> Iterator[None]:
    server = next(c for c in stack.group.children if c.name == "mlflow")
    stack.group.stop(server)
    try:
        yield
    finally:  # the same server, store and port as before
        restarted = stack.group.start("mlflow", mlflow_command(stack.settings))
        wait_http(f"{stack.settings.mlflow_tracking_uri}/health", restarted, timeout_s=120)


def assert_every_step_once(stack: Stack, job: dict) -> None:
    metrics = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    total = job["progress"]["total_steps"]
    for key in ("train_loss", "lr", "grad_norm"):
        assert [p["step"] for p in metrics[key]] == list(range(total)), key
    assert len(metrics["val_accuracy"]) == job["spec"]["epochs"]
    assert job["attempts"] == 1  # waiting on MLflow never looked like a lost worker
    assert stack.mlflow.get_run(job["mlflow"]["run_id"]).info.status == "FINISHED"


def test_mlflow_down_at_the_start_the_job_trains_and_its_run_appears_later(stack: Stack) -> None:
    with mlflow_down(stack):
        job = stack.submit(DIGITS_ADAM | {"name": "it-mlflow-down-at-start", "epochs": 10})
        deadline = time.monotonic() + 120
        while (current := stack.get(job["id"]))["progress"]["step"] < current["progress"]["total_steps"]:
            assert current["status"] in {"queued", "running"}, current  # training goes on without MLflow
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert current["mlflow"]["run_id"] is None  # no run yet: MLflow is down
        assert current["status"] == "running"  # done training, waiting to hand its metrics over
    done = stack.wait(job["id"], timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["mlflow"]["run_id"] is not None
    assert_every_step_once(stack, done)


def test_mlflow_down_mid_job_loses_nothing(stack: Stack) -> None:
    job = stack.submit(DIGITS_ADAM | {"name": "it-mlflow-down-mid-job", "epochs": 150})
    deadline = time.monotonic() + 120
    while (current := stack.get(job["id"]))["progress"]["step"] < 300 or not current["mlflow"]["run_id"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with mlflow_down(stack):
        time.sleep(3)  # the job trains on, buffering
        assert stack.get(job["id"])["status"] == "running"
    done = stack.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    assert_every_step_once(stack, done)
