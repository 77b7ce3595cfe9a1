"""The newer models through the real worker: a sequence model and a CNN train to the
end, and their logged MLflow models load back and classify."""

from __future__ import annotations

import mlflow
import pytest
import torch

from tests.integration.conftest import Stack


@pytest.mark.parametrize(
    "spec",
    [
        {"dataset": {"name": "sequence_memory", "length": 12, "n_samples": 400},
         "model": {"arch": "lstm", "hidden_size": 16}, "optimizer": {"name": "adam", "lr": 0.003}},
        {"dataset": {"name": "digits"}, "model": {"arch": "cnn"}, "optimizer": {"name": "adam", "lr": 0.003}},
    ],
    ids=["lstm", "cnn"],
)  # fmt: skip
def test_a_model_trains_and_its_logged_model_loads(stack: Stack, spec: dict) -> None:
    job = stack.wait(stack.submit({"name": f"it-{spec['model']['arch']}", "epochs": 2, "batch_size": 32} | spec)["id"])
    assert job["status"] == "succeeded", job["error"]
    [logged] = stack.mlflow.search_logged_models(
        experiment_ids=[job["mlflow"]["experiment_id"]], filter_string=f"source_run_id = '{job['mlflow']['run_id']}'"
    )
    mlflow.set_tracking_uri(stack.settings.mlflow_tracking_uri)
    model = mlflow.pytorch.load_model(f"models:/{logged.model_id}").eval()
    assert sum(p.numel() for p in model.parameters()) > 0
    with torch.no_grad():
        if spec["model"]["arch"] == "cnn":
            out = model(torch.zeros(4, 1, 8, 8))
        else:
            out = model(torch.zeros(4, 12, dtype=torch.long))
    assert out.shape[0] == 4 and torch.isfinite(out).all()
