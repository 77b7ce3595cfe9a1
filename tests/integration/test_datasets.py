"""Your own data through the real stack: a CSV uploaded with the `descent` command (the
client, the API, PostgreSQL), jobs on it trained by a real worker that reads the arrays
from PostgreSQL, the MLflow run's input dataset with the file's digest, and a delete
refused while a job runs and allowed after."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from tests.integration.conftest import Stack
from tests.integration.test_cli import descent


def blobs_csv(rows: int = 300) -> bytes:
    """Three well separated classes named by strings, four features."""
    rng = np.random.default_rng(11)
    y = np.arange(rows) % 3
    frame = pd.DataFrame(rng.normal(size=(rows, 4)) + 4.0 * y[:, None], columns=["w", "x", "y", "z"])
    frame["kind"] = np.array(["red", "green", "blue"])[y]
    return frame.to_csv(index=False).encode()


def test_an_uploaded_csv_trains_to_success_and_cannot_be_deleted_while_in_use(stack: Stack, tmp_path: Path) -> None:
    content = blobs_csv()
    path = tmp_path / "blobs.csv"
    path.write_bytes(content)
    uploaded = descent(stack, "datasets", "upload", str(path), "--label", "kind", "--name", "it-blobs", "-o", "json")
    assert uploaded.returncode == 0, uploaded
    dataset = json.loads(uploaded.stdout)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()
    assert (dataset["n_rows"], dataset["shape"], dataset["classes"]) == (300, [4], ["blue", "green", "red"])
    again = stack.api.post("/v1/datasets", files={"file": ("again.csv", content)}, data={"label": "kind"})
    assert again.status_code == 200 and again.json()["id"] == dataset["id"]
    listed = descent(stack, "datasets", "list", "-o", "json")
    assert listed.returncode == 0 and dataset["id"] in [d["id"] for d in json.loads(listed.stdout)], listed

    # A long job on it holds it: deleting is refused, naming the job.
    long_job = stack.submit({"name": "it-upload-long", "dataset": {"id": dataset["id"]}, "epochs": 5000})
    stack.wait(long_job["id"], until={"running"}, timeout_s=60)
    refused = stack.api.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and long_job["id"] in refused.json()["detail"], refused.text
    by_cli = descent(stack, "datasets", "delete", dataset["id"])
    assert by_cli.returncode == 3 and long_job["id"] in by_cli.stderr, by_cli

    # Meanwhile a short job trains on it to success (the worker reads the arrays from PostgreSQL).
    job = stack.submit({"name": "it-upload", "dataset": {"id": dataset["id"], "val_fraction": 0.25}, "epochs": 10,
                        "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01}})  # fmt: skip
    assert job["spec"]["dataset"]["sha256"] == dataset["sha256"]
    done = stack.wait(job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["val_accuracy"] > 0.9

    run = stack.mlflow.get_run(done["mlflow"]["run_id"])
    assert run.data.tags["dataset"] == "it-blobs"
    [recorded] = run.inputs.dataset_inputs
    assert recorded.dataset.name == "it-blobs"
    assert recorded.dataset.digest == dataset["sha256"][: len(recorded.dataset.digest)]
    assert len(recorded.dataset.digest) >= 32
    assert json.loads(recorded.dataset.source)["sha256"] == dataset["sha256"]
    assert {t.key: t.value for t in recorded.tags}["mlflow.data.context"] == "training"

    # Once no job needs it any more, it goes.
    assert stack.api.post(f"/v1/jobs/{long_job['id']}/cancel").status_code == 202
    assert stack.wait(long_job["id"])["status"] == "cancelled"
    deleted = descent(stack, "datasets", "delete", dataset["id"])
    assert deleted.returncode == 0, deleted
    gone = descent(stack, "datasets", "show", dataset["id"])
    assert gone.returncode == 3 and "not found" in gone.stderr, gone
