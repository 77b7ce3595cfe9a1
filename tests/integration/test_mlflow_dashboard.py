"""What the MLflow run of a job says about it, through the real stack: who submitted it
(`mlflow.user`, from the API key that sent it, for a job, a study's parent run and its
trials), and the final model as a logged model of the run with its metrics linked."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from tests.integration.conftest import Stack

IRIS = {"experiment": "dashboard", "dataset": {"name": "iris"}, "model": {"arch": "mlp", "hidden": [16]},
        "optimizer": {"name": "adam", "lr": 0.01}, "epochs": 3, "batch_size": 16, "seed": 0}  # fmt: skip


def project_client(stack: Stack, label: str | None) -> tuple[str, httpx.Client]:
    """A new project and a client holding a key of it (labelled `label`)."""
    project = stack.api.post("/v1/projects", json={"name": f"dash-{uuid.uuid4().hex[:8]}"}).json()["name"]
    response = stack.api.post(f"/v1/projects/{project}/keys", json={"label": label} if label else {})
    assert response.status_code == 201, response.text
    client = httpx.Client(base_url=str(stack.api.base_url), timeout=30,
                          headers={"Authorization": f"Bearer {response.json()['key']}"})  # fmt: skip
    return project, client


def submitted(stack: Stack, client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 201, response.text
    return response.json()


def ended(client: httpx.Client, path: str, timeout_s: float = 180) -> dict:
    """The job or study at `path` once it ended (a key sees only its own project's)."""
    deadline = time.monotonic() + timeout_s
    while (thing := client.get(path).json())["status"] in {"queued", "running", "cancelling"}:
        assert time.monotonic() < deadline, thing
        time.sleep(0.3)
    return thing


def test_a_jobs_run_names_its_key_and_links_the_final_metrics_to_its_model(stack: Stack) -> None:
    project, alice = project_client(stack, "alice's laptop")
    with alice:
        job = ended(alice, f"/v1/jobs/{submitted(stack, alice, '/v1/jobs', IRIS | {'name': 'dash-job'})['id']}")
    assert job["status"] == "succeeded", job["error"]
    run = stack.mlflow.get_run(job["mlflow"]["run_id"])
    assert run.data.tags["mlflow.user"] == f"alice's laptop ({project})"

    [model] = stack.mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run.info.run_id}'")  # fmt: skip
    assert model.tags["mlflow.user"] == f"alice's laptop ({project})"  # its UI's "Created by" too
    linked = {m.key: m for m in stack.mlflow.get_logged_model(model.model_id).metrics}
    assert set(linked) == {"val_loss", "val_accuracy"}
    for key, metric in linked.items():
        history = stack.mlflow.get_metric_history(run.info.run_id, key)
        assert len(history) == IRIS["epochs"]  # linking added no point to the run's curve
        last = history[-1]
        assert (metric.value, metric.step, metric.timestamp) == (last.value, last.step, last.timestamp)
        assert metric.run_id == run.info.run_id and metric.dataset_name == "iris"
    assert linked["val_accuracy"].value == pytest.approx(job["metrics"]["val_accuracy"])
    [dataset] = run.inputs.dataset_inputs
    assert linked["val_loss"].dataset_digest == dataset.dataset.digest


def test_a_studys_parent_run_and_trials_name_the_key_that_submitted_it(stack: Stack) -> None:
    project, unlabelled = project_client(stack, None)
    study_body = {"name": "dash-study", "base": IRIS | {"epochs": 1},
                  "space": {"optimizer.lr": {"grid": [0.01, 0.1]}}}  # fmt: skip
    with unlabelled:
        key_prefix = unlabelled.headers["Authorization"].removeprefix("Bearer ")[:12]  # how a key is listed
        study = ended(unlabelled, f"/v1/studies/{submitted(stack, unlabelled, '/v1/studies', study_body)['id']}")
    assert study["status"] == "succeeded", study
    who = f"{key_prefix} ({project})"
    parent = stack.mlflow.get_run(study["mlflow"]["run_id"])
    assert parent.data.tags["mlflow.user"] == who
    assert parent.data.tags["mlflow.source.name"] == "descent"
    trials = stack.mlflow.search_runs([study["mlflow"]["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")  # fmt: skip
    assert len(trials) == 2 and {t.data.tags["mlflow.user"] for t in trials} == {who}
