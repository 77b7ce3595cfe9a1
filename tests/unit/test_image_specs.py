"""The image sets through the API: catalog entries with their fields, and 422s that name the field."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

IMAGE_SETS = {"mnist": "1x28x28", "fashion_mnist": "1x28x28", "kmnist": "1x28x28", "cifar10": "3x32x32", "cifar100": "3x32x32"}


def job(dataset: dict, model: dict | None = None, **extra: object) -> dict:
    return {"dataset": dataset, "model": model or {"arch": "mlp"}, "epochs": 1, "batch_size": 128} | extra


def test_catalog_lists_each_image_set_with_its_fields_and_shapes(client: TestClient) -> None:
    datasets = {entry["name"]: entry for entry in client.get("/v1/catalog").json()["datasets"]}
    for name, image in IMAGE_SETS.items():
        entry = datasets[name]
        assert {"validation", "val_fraction", "subset", "augment"} <= set(entry["fields"]), name
        assert entry["fields"]["validation"]["default"] == "test"
        assert set(entry["fields"]["augment"]["properties"]) == {"random_crop", "horizontal_flip", "cutout"}
        assert any(image in shape for shape in entry["shapes"]), (name, entry["shapes"])
        assert entry["description"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (job({"name": "mnist"}), {"validation": "test", "val_fraction": None, "subset": None}),
        (job({"name": "kmnist", "validation": 0.1}), {"validation": 0.1, "val_fraction": 0.1}),
        (job({"name": "fashion_mnist", "val_fraction": 0.2}), {"validation": 0.2, "val_fraction": 0.2}),
        (job({"name": "cifar100", "subset": 1000}), {"subset": 1000}),
    ],
)
def test_image_set_specs_are_stored_one_way(client: TestClient, body: dict, expected: dict) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    stored = response.json()["spec"]["dataset"]
    assert {key: stored[key] for key in expected} == expected
    client.post(f"/v1/jobs/{response.json()['id']}/cancel")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job({"name": "mnist", "augment": {"horizontal_flip": True}}, {"arch": "lstm"}), "dataset.augment"),
        (job({"name": "kmnist", "augment": {"random_crop": {"padding": 2}}}, {"arch": "transformer"}), "dataset.augment"),
        (job({"name": "mnist", "augment": {"cutout": {"size": 30}}}, {"arch": "cnn"}), "dataset.augment.cutout.size"),
        (job({"name": "cifar10", "augment": {"random_crop": {"padding": 0}}}), "dataset.augment.random_crop.padding"),
        (job({"name": "cifar10", "augment": {"rotate": 15}}), "dataset.augment.rotate"),
        (job({"name": "cifar10", "subset": 50_001}), "dataset.subset"),
        (job({"name": "cifar100", "subset": 99}), "dataset.subset"),
        (job({"name": "mnist", "validation": "holdout"}), "dataset.validation"),
        (job({"name": "mnist", "validation": 1.5}), "dataset.validation"),
        (job({"name": "mnist", "validation": "val_fraction"}), "dataset.val_fraction"),
        (job({"name": "mnist", "validation": "test", "val_fraction": 0.1}), "dataset.val_fraction"),
        (job({"name": "mnist", "validation": 0.1, "val_fraction": 0.2}), "dataset.val_fraction"),
        (job({"name": "cifar10"}, {"arch": "lstm"}), "model.arch"),
    ],
)
def test_bad_image_set_specs_are_422s_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    fields = [detail["field"] for detail in response.json()["detail"]]
    assert field in fields, fields


def test_augmenting_the_flat_image_is_allowed(client: TestClient) -> None:
    # The mlp reads the same pixels flat: the crop and the flip happen to the image first.
    body = job({"name": "cifar10", "augment": {"random_crop": {"padding": 4}, "horizontal_flip": True}})
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    client.post(f"/v1/jobs/{response.json()['id']}/cancel")
