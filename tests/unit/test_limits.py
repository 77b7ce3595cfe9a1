"""Operator limits: a job over one is a 422 naming the field and the setting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import app
from jobs.settings import settings
from jobs.spec import DATASETS, JobSpec, MLPModel
from trainer.data import DATASET_LOADERS, IMAGE_LOADERS
from trainer.models import build_mlp



@pytest.mark.parametrize("hidden", [[], [7], [128, 64], [3, 5, 9]])
def test_the_parameter_count_is_the_one_torch_builds(hidden: list[int]) -> None:
    model = MLPModel(arch="mlp", hidden=hidden)
    assert model.n_parameters(13, 3) == sum(p.numel() for p in build_mlp(model, 13, 3).parameters())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_states_its_feature_count(name: str, image_cache: Path) -> None:
    spec = JobSpec.model_validate({"dataset": {"name": name}, "epochs": 1, "schedule": {"name": "constant"}})
    if name in IMAGE_LOADERS:  # read from the test cache's files, as the trainer reads them
        x = IMAGE_LOADERS[name](image_cache).x_train
        assert spec.dataset.n_features == math.prod(x.shape[1:])
    else:
        x, _, _ = DATASET_LOADERS[name](spec.dataset, 0)
        assert spec.dataset.n_features == x.shape[1]


@pytest.mark.parametrize(
    ("setting", "value", "spec", "field", "words"),
    [
        ("max_epochs", 5, {"epochs": 6}, "epochs", "MAX_EPOCHS"),
        ("max_total_steps", 100, {"epochs": 5}, "epochs", "MAX_TOTAL_STEPS"),  # digits: 5 x 23 steps
        ("max_dataset_samples", 1000, {"dataset": {"name": "digits"}}, "dataset", "MAX_DATASET_SAMPLES"),
        ("max_dataset_values", 1_000_000, {"dataset": {"name": "sequence_memory", "n_samples": 1000, "length": 2000}},
         "dataset", "MAX_DATASET_VALUES"),  # fmt: skip
        ("max_model_parameters", 10_000, {"model": {"arch": "mlp", "hidden": [128, 64]}}, "model", "MAX_MODEL_PARAMETERS"),
        ("max_hessian_parameters", 1000, {"diagnostics": {"hessian": {}}}, "diagnostics.hessian",
         "MAX_HESSIAN_PARAMETERS"),  # fmt: skip
    ],
)
def test_a_job_over_a_limit_is_a_422_naming_it(  # noqa: PLR0913
    client: TestClient, monkeypatch: pytest.MonkeyPatch, setting: str, value: int, spec: dict, field: str, words: str
) -> None:
    before = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
    monkeypatch.setattr(settings, setting, value)
    response = client.post("/v1/jobs", json={"epochs": 2} | spec)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == field and detail["type"] == "limit_exceeded"
    assert words in detail["msg"] and f"{value:,}" in detail["msg"]
    assert client.get("/v1/jobs", params={"limit": 100}).json()["items"] == before  # nothing written


def test_within_the_limits_a_job_is_accepted(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "max_epochs", 5)
    assert client.post("/v1/jobs", json={"epochs": 5, "dataset": {"name": "iris"}}).status_code == 201
