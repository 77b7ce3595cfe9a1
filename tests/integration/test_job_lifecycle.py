"""A job's whole life through the real stack: REST -> PostgreSQL -> Redis -> Celery
worker -> PyTorch -> MLflow server, and back out through the API."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import Stack

DIGITS_ADAM = {
    "name": "it-adam-digits",
    "experiment": "integration",
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "model": {"arch": "mlp", "hidden": [128, 64]},
    "optimizer": {"name": "adam", "lr": 0.001},
    "schedule": {"name": "warmup_cosine", "warmup_steps": 50},
    "epochs": 15,
    "batch_size": 64,
    "seed": 0,
    "log_every_steps": 1,
}


def events(stack: Stack, job_id: str) -> list[tuple[str | None, str]]:
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT from_status, to_status FROM job_events WHERE job_id = :id ORDER BY id"),
                {"id": job_id},
            ).all()
    finally:
        engine.dispose()
    return [tuple(r) for r in rows]


def test_job_trains_to_success_and_metrics_reach_mlflow(stack: Stack) -> None:
    submitted = stack.submit(DIGITS_ADAM)
    assert submitted["status"] == "queued"
    assert submitted["progress"]["total_steps"] == 15 * 23

    job = stack.wait(submitted["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["metrics"]["val_accuracy"] > 0.9
    assert job["progress"] == {"epoch": 15, "step": 345, "total_steps": 345, "fraction": 1.0}
    started, trained, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "trained_at", "finished_at"))
    assert started < trained < finished and job["error"] is None  # trained: its results then went to MLflow
    assert events(stack, job["id"]) == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]

    # Every step's metrics were flushed to MLflow before the job said it was done.
    metrics = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in metrics["train_loss"]] == list(range(345))
    assert [p["step"] for p in metrics["lr"]] == list(range(345))
    assert len(metrics["grad_norm"]) == 345
    assert len(metrics["val_accuracy"]) == 15
    assert metrics["val_accuracy"][-1]["value"] == pytest.approx(job["metrics"]["val_accuracy"])
    # Warm-up is visible in the recorded learning rate: from ~0 to lr at step 49.
    lrs = [p["value"] for p in metrics["lr"]]
    assert lrs[0] == pytest.approx(0.001 / 50) and lrs[49] == pytest.approx(0.001)

    run = stack.mlflow.get_run(job["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == job["mlflow"]["experiment_id"]
    assert stack.mlflow.get_experiment(run.info.experiment_id).name == "default/integration"  # <project>/<experiment>
    assert run.data.params["optimizer.name"] == "adam"
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["schedule.warmup_steps"] == "50"
    assert run.data.tags["optimizer"] == "adam" and run.data.tags["dataset"] == "digits"
    assert run.data.tags["descent.job_id"] == job["id"]
    assert run.data.tags["descent.project"] == job["project"] == "default"
    # MLflow's own tags: its UI's "Source", "Created by" and description, and the experiment's model-training view.
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mlflow.source.name"] == "descent"
    assert run.data.tags["mlflow.user"] == "default"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("Descent job `it-adam-digits` of project `default`: model mlp (hidden [128, 64], ")
    assert "digits (1437 training / 360 validation samples, 20% held out" in note
    assert "with adam (lr 0.001), schedule warmup_cosine (warmup_steps 50), for 15 epochs of batch size 64" in note
    assert note.endswith("seed 0.")
    experiment = stack.mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    artifacts = {a.path for a in stack.mlflow.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "confusion_matrix.json", "confusion_matrix.png"} <= artifacts
    assert job["mlflow"]["run_url"].endswith(
        f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics?workflowType=machine_learning"
    )
    # One model, READY: its record was made while the job trained, its files sent at the end
    [model] = stack.mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run.info.run_id}'")  # fmt: skip
    assert str(model.status) == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]


def models_of(stack: Stack, run_id: str) -> list:
    """The run's model records MLflow lists (deleted ones are not)."""
    experiment_id = stack.mlflow.get_run(run_id).info.experiment_id
    return stack.mlflow.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'")


def test_running_job_stops_within_seconds_of_cancel(stack: Stack) -> None:
    long_job = DIGITS_ADAM | {"name": "it-cancel-me", "epochs": 5000, "schedule": {"name": "constant"}}
    job = stack.submit(long_job)
    stack.wait(job["id"], until={"running"})
    deadline = time.monotonic() + 60
    while stack.get(job["id"])["progress"]["step"] == 0:  # it is really training
        assert time.monotonic() < deadline
        time.sleep(0.2)

    response = stack.api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] in {"cancelling", "cancelled"}
    asked = time.monotonic()
    done = stack.wait(job["id"], timeout_s=30)
    stopped_after = time.monotonic() - asked

    assert done["status"] == "cancelled"
    assert stopped_after < 5, f"took {stopped_after:.1f} s to stop"
    assert 0 < done["progress"]["step"] < done["progress"]["total_steps"]
    assert stack.mlflow.get_run(done["mlflow"]["run_id"]).info.status == "KILLED"
    assert models_of(stack, done["mlflow"]["run_id"]) == []  # the record made while it trained is deleted
    assert events(stack, job["id"])[-2:] == [("running", "cancelling"), ("cancelling", "cancelled")]
    # A finished job cannot be cancelled.
    again = stack.api.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["detail"]


def test_diverging_job_fails_with_the_reason(stack: Stack) -> None:
    job = stack.submit(DIGITS_ADAM | {"name": "it-diverge", "optimizer": {"name": "sgd", "lr": 1e3},
                                      "schedule": {"name": "constant"}})  # fmt: skip
    done = stack.wait(job["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "TrainingDiverged"
    assert "diverged at step" in done["error"]["message"]
    assert stack.mlflow.get_run(done["mlflow"]["run_id"]).info.status == "FAILED"
    assert models_of(stack, done["mlflow"]["run_id"]) == []


def test_duplicate_delivery_runs_the_job_once(stack: Stack) -> None:
    job = stack.submit(DIGITS_ADAM | {"name": "it-duplicate", "epochs": 2, "schedule": {"name": "constant"}})
    stack.enqueue_raw(job["id"])  # the same message a second time
    stack.enqueue_raw(job["id"])  # and a third
    done = stack.wait(job["id"])
    time.sleep(2)  # let the extra deliveries reach the worker
    assert done["status"] == "succeeded"
    assert stack.get(job["id"])["attempts"] == 1
    assert [e for e in events(stack, job["id"]) if e[1] == "running"] == [("queued", "running")]
    runs = stack.mlflow.search_runs(
        [done["mlflow"]["experiment_id"]], filter_string=f"tags.`descent.job_id` = '{job['id']}'"
    )
    assert len(runs) == 1


def test_readyz_reports_database_and_broker(stack: Stack) -> None:
    response = stack.api.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}
