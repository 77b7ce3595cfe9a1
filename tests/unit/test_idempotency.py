"""Idempotency-Key on POST /v1/jobs: a retried submission never makes a second job."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from api.main import app

SPEC = {"name": "retry-me", "dataset": {"name": "iris"}, "epochs": 2}



def post(client: TestClient, spec: dict, key: str | None) -> object:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/jobs", json=spec, headers=headers)


def test_same_key_and_spec_returns_the_same_job(client: TestClient) -> None:
    key = f"k-{uuid.uuid4()}"
    first = post(client, SPEC, key)
    assert first.status_code == 201
    again = post(client, SPEC, key)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    # Key order and defaults written out or left implicit are the same spec.
    explicit = {"epochs": 2, "dataset": {"val_fraction": 0.2, "name": "iris"}, "name": "retry-me", "seed": 0}
    assert post(client, explicit, key).json()["id"] == first.json()["id"]


def test_same_key_with_another_spec_is_a_409_and_creates_nothing(client: TestClient) -> None:
    key = f"k-{uuid.uuid4()}"
    first = post(client, SPEC, key)
    before = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
    conflict = post(client, SPEC | {"epochs": 3}, key)
    assert conflict.status_code == 409
    assert key in conflict.json()["detail"] and first.json()["id"] in conflict.json()["detail"]
    assert len(client.get("/v1/jobs", params={"limit": 100}).json()["items"]) == before


def test_without_a_key_every_post_is_a_new_job(client: TestClient) -> None:
    assert post(client, SPEC, None).json()["id"] != post(client, SPEC, None).json()["id"]


@pytest.mark.parametrize("bad", ["", "x" * 201, "has space", "tab\\tkey"])
def test_a_malformed_key_is_a_422_naming_the_header(client: TestClient, bad: str) -> None:
    response = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": bad.replace("\\t", "\t")})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "Idempotency-Key"
