"""A worker killed mid-job (SIGKILL: no cleanup, no goodbye): the lease runs out, the
reaper requeues the job, the next attempt resumes from the checkpoint in
PostgreSQL into the same MLflow run, and the job ends as if nothing happened."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import pytest
import torch
from sqlalchemy import create_engine, text

from tests.integration.conftest import Stack
from tests.integration.test_job_lifecycle import DIGITS_ADAM, events

LONG_JOB = DIGITS_ADAM | {"epochs": 200, "checkpoint_every_steps": 50, "seed": 7}  # 4600 steps


def worker_pid(stack: Stack, job_id: str) -> int:
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            worker = conn.execute(text("SELECT worker FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    finally:
        engine.dispose()
    return int(worker.rsplit(":", 1)[1])


def final_weights(stack: Stack, run_id: str, experiment_id: str) -> dict[str, torch.Tensor]:
    [model] = stack.mlflow.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    mlflow.set_tracking_uri(stack.settings.mlflow_tracking_uri)
    return mlflow.pytorch.load_model(f"models:/{model.model_id}").state_dict()


def test_sigkilled_worker_resumes_from_checkpoint_exactly(stack: Stack) -> None:
    reference = stack.wait(stack.submit(LONG_JOB | {"name": "it-never-stopped"})["id"], timeout_s=300)
    assert reference["status"] == "succeeded", reference["error"]

    job = stack.submit(LONG_JOB | {"name": "it-killed"})
    deadline = time.monotonic() + 120
    while stack.get(job["id"])["progress"]["step"] < 1000:  # well past a few checkpoints
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.1)
    os.kill(worker_pid(stack, job["id"]), signal.SIGKILL)
    killed_at = stack.get(job["id"])["progress"]["step"]
    assert killed_at < job["progress"]["total_steps"], "the job finished before it could be killed"

    done = stack.wait(job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    history = events(stack, job["id"])
    assert ("running", "queued") in history  # the reaper requeued it
    assert history[-1] == ("running", "succeeded")

    # One MLflow run, every step exactly once, the same values as the run never stopped.
    assert done["mlflow"]["run_id"] == job["mlflow"]["run_id"] or job["mlflow"]["run_id"] is None
    got = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    want = stack.api.get(f"/v1/jobs/{reference['id']}/metrics").json()
    total = done["progress"]["total_steps"]
    for key in ("train_loss", "lr", "grad_norm"):
        assert [p["step"] for p in got[key]] == list(range(total)), key
        assert [p["value"] for p in got[key]] == [p["value"] for p in want[key]], key
    assert [p["step"] for p in got["val_accuracy"]] == [p["step"] for p in want["val_accuracy"]]
    assert done["metrics"] == reference["metrics"]
    run = stack.mlflow.get_run(done["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["descent.attempt"] == "2"

    # Bit for bit: the final weights equal those of the job that was never interrupted.
    expected = final_weights(stack, reference["mlflow"]["run_id"], reference["mlflow"]["experiment_id"])
    actual = final_weights(stack, done["mlflow"]["run_id"], done["mlflow"]["experiment_id"])
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


@pytest.mark.parametrize("max_attempts", [1])
def test_a_job_out_of_attempts_fails_with_worker_lost(stack: Stack, max_attempts: int) -> None:
    job = stack.submit(LONG_JOB | {"name": "it-killed-once", "max_attempts": max_attempts})
    deadline = time.monotonic() + 120
    while stack.get(job["id"])["progress"]["step"] < 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(worker_pid(stack, job["id"]), signal.SIGKILL)
    done = stack.wait(job["id"], timeout_s=60)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "WorkerLost"
    assert "worker lost" in done["error"]["message"] and "no attempts left" in done["error"]["message"]
    assert stack.mlflow.get_run(done["mlflow"]["run_id"]).info.status == "FAILED"


def test_a_job_past_its_timeout_fails_saying_so(stack: Stack) -> None:
    job = stack.submit(LONG_JOB | {"name": "it-timeout", "epochs": 5000, "timeout_s": 3})
    done = stack.wait(job["id"], timeout_s=60)
    assert done["status"] == "failed"
    assert done["error"]["type"] == "TimeoutError"
    assert done["error"]["message"].startswith("timed out after 3 s")
    assert stack.mlflow.get_run(done["mlflow"]["run_id"]).info.status == "FAILED"


def test_a_frozen_worker_that_wakes_after_losing_its_lease_adds_nothing(stack: Stack) -> None:
    # SIGSTOP, not SIGKILL: the process comes back (a stalled VM, a debugger, swapping)
    # with metric points still buffered, after the job went to another attempt.
    job = stack.submit(DIGITS_ADAM | {"name": "it-frozen", "epochs": 60, "checkpoint_every_steps": 50})
    deadline = time.monotonic() + 120
    while stack.get(job["id"])["progress"]["step"] < 300:
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.1)
    frozen = worker_pid(stack, job["id"])
    os.kill(frozen, signal.SIGSTOP)
    try:
        # Frozen inside a transaction (between a write to its job's row and the commit), the
        # process holds its job's row, which the reaper skips (skip_locked), until PostgreSQL
        # ends its session (DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_S): the bound on the requeue.
        s = stack.settings
        deadline = time.monotonic() + s.database_idle_in_transaction_timeout_s + 10 * s.lease_s + 30
        while (current := stack.get(job["id"]))["attempts"] < 2:  # the reaper gave it to a second attempt
            assert time.monotonic() < deadline, current
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        os.kill(frozen, signal.SIGCONT)
    done = stack.wait(job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    got = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    for key in ("train_loss", "lr", "grad_norm"):
        assert [p["step"] for p in got[key]] == list(range(done["progress"]["total_steps"])), key
