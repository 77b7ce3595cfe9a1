"""Dataset uploads through the real API (TestClient, the unit SQLite): every refusal is a
4xx that names the problem and stores nothing; the same file twice is one dataset; a
project sees only its own; a job names an upload by id and gets its metadata from the
server; the trainer trains on the stored arrays."""

from __future__ import annotations

import hashlib
import io
import uuid

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from jobs.dataset_store import DatasetUnavailable, read_dataset_arrays
from jobs.db import session_scope
from jobs.models import Dataset
from jobs.settings import settings
from jobs.spec import JobSpec, UploadedDataset
from jobs.uploads import decode_arrays
from tests.unit.test_access import bearer, new_key, new_project
from trainer.recipe import run_training


def table_csv(rows: int = 60, seed: int = 0, label: str = "species") -> bytes:
    """Two separable classes named by strings, three numeric features."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    x = rng.normal(size=(rows, 3)) + 3.0 * y[:, None]
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame[label] = np.where(y == 1, "setosa", "virginica")
    return frame.to_csv(index=False).encode()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def parquet_bytes(columns: dict) -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame(columns).to_parquet(buffer)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def upload(client: TestClient, content: bytes, filename: str = "data.csv", headers: dict | None = None, **form: str):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=form, headers=headers or {})


def uploaded(client: TestClient, content: bytes | None = None, filename: str = "data.csv", **form: str) -> dict:
    form = {"label": "species"} | form if filename.endswith(".csv") else form
    response = upload(client, content if content is not None else table_csv(seed=int(uuid.uuid4().int % 10_000)),
                      filename, **form)  # fmt: skip
    assert response.status_code in (200, 201), response.text
    return response.json()


def dataset_count(client: TestClient) -> int:
    return len(client.get("/v1/datasets", params={"limit": 1000}).json()["items"])


# --------------------------------------------------------------------------- refusals

NPZ_X = np.random.default_rng(0).normal(size=(10, 3))
REFUSED = [
    # (filename, content, form, status, field, words in the message)
    ("empty.csv", b"", {"label": "y"}, 422, "file", ["empty"]),
    ("data.xlsx", b"PK\x03\x04 a spreadsheet", {"label": "y"}, 415, None, [".xlsx", "CSV", "Parquet", "NPZ"]),
    ("data.parquet", b"not parquet at all", {"label": "y"}, 422, "file", ["cannot be read as Parquet"]),
    ("data.npz", b"PK\x03\x04 broken zip", {}, 422, "file", ["cannot be read as NPZ"]),
    ("data.csv", b'a,y\n"unterminated,1\n2,0\n', {"label": "y"}, 422, "file", ["cannot be read as CSV"]),
    ("data.csv", b"a,b,y\n1,2,0\n3,4,1\n", {}, 422, "label", ["label column", "'a'", "'b'", "'y'"]),
    ("data.csv", b"a,b,y\n1,2,0\n3,4,1\n", {"label": "target"}, 422, "label", ["'target'", "'a'", "'b'", "'y'"]),
    ("data.csv", b"a,colour,y\n1,red,0\n3,blue,1\n5,red,0\n7,red,1\n", {"label": "y"}, 422, "file",
     ["numeric", "'colour'"]),
    ("data.csv", b"a,b,y\n1,,0\n3,inf,1\n5,6,0\n7,8,1\n", {"label": "y"}, 422, "file", ["2 NaN or infinite", "'b'"]),
    ("data.csv", b"a,y\n1,0\n2,0\n3,0\n", {"label": "y"}, 422, "file", ["single class"]),
    ("data.csv", b"a,y\n1,0\n2,0\n3,1\n", {"label": "y"}, 422, "file", ["at least 2 rows", "'1' (1)"]),
    ("data.csv", b"a,y\n1,0\n2,\n3,1\n4,1\n", {"label": "y"}, 422, "file", ["label column 'y'", "1 empty"]),
    ("data.npz", npz_bytes(X=NPZ_X, y=np.arange(8) % 2), {}, 422, "file", ["X has 10 samples but y has 8"]),
    ("data.npz", npz_bytes(X=NPZ_X), {}, 422, "file", ["X and y", "missing 'y'"]),
    ("data.npz", npy_bytes(NPZ_X), {}, 422, "file", ["single NumPy array", "np.savez"]),
    ("data.npz", npz_bytes(X=NPZ_X[:, 0], y=np.arange(10) % 2), {}, 422, "file", ["2-D", "1-D"]),
    ("data.npz", npz_bytes(X=np.array([{"a": 1}] * 10, dtype=object), y=np.arange(10) % 2), {}, 422, "file",
     ["cannot be read as NPZ", "allow_pickle"]),
    ("data.npz", npz_bytes(X=np.where(np.eye(10, 3) > 0, np.nan, 1.0), y=np.arange(10) % 2), {}, 422, "file",
     ["3 NaN or infinite", "X[:, 0]"]),
    # What a file declares, refused before it is read:
    ("data.csv", b"a,a,b,y\n1,2,3,0\n4,5,6,1\n", {"label": "y"}, 422, "file", ["unique", "'a' (2 times)"]),
    ("data.csv", ("x" * 201 + ",y\n1,0\n2,1\n").encode(), {"label": "y"}, 422, "file", ["200 characters"]),
    ("data.parquet", parquet_bytes({"a": [[1.0], [2.0]] * 5, "y": [0, 1] * 5}), {"label": "y"}, 422, "file",
     ["numeric", "'a'"]),
    ("data.parquet", parquet_bytes({"a": [1.0, 2.0] * 5, "y": [[0], [1]] * 5}), {"label": "y"}, 422, "file",
     ["label column 'y'", "numbers or text"]),
    ("data.npz", npz_bytes(X=NPZ_X, y=np.array(["a" * 101, "b"] * 5)), {}, 413, None, ["MAX_CLASS_NAME_CHARS"]),
    ("data.npz", npz_bytes(X=np.zeros((0, 3)), y=np.arange(0)), {}, 422,
     "file", ["X is empty"]),
    ("data.csv", b"a,y\n" + b"".join(f"{i},{'z' * 101 if i % 2 else 'b'}\n".encode() for i in range(4)),
     {"label": "y"}, 413, None, ["101 characters", "MAX_CLASS_NAME_CHARS"]),
]  # fmt: skip


@pytest.mark.parametrize(("filename", "content", "form", "status", "field", "words"), REFUSED,
                         ids=[f"{i}-{r[0]}-{r[5][0]}" for i, r in enumerate(REFUSED)])  # fmt: skip
def test_a_bad_file_is_a_4xx_naming_the_problem_and_nothing_is_stored(
    client: TestClient, filename: str, content: bytes, form: dict, status: int, field: str | None, words: list[str]
) -> None:
    before = dataset_count(client)
    response = upload(client, content, filename, **form)
    assert response.status_code == status, response.text
    body = response.json()
    if status == 422:
        [detail] = body["detail"]
        assert detail["field"] == field
        message = detail["msg"]
    else:
        message = body["detail"]
    for word in words:
        assert word in message, (word, message)
    assert dataset_count(client) == before


def test_a_file_over_the_upload_limit_is_a_413_naming_the_setting(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = table_csv(rows=200)
    monkeypatch.setattr(settings, "max_upload_bytes", len(content) - 1)
    response = upload(client, content, label="species")
    assert response.status_code == 413
    assert "MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_a_dataset_over_the_value_limit_is_a_413_naming_the_setting(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_dataset_values", 100)  # 60 rows x 3 features = 180
    response = upload(client, table_csv(seed=1), label="species")
    assert response.status_code == 413
    assert "MAX_DATASET_VALUES" in response.json()["detail"] and "180" in response.json()["detail"]


def test_more_classes_than_the_limit_is_a_413_naming_the_setting(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_classes", 2)
    content = b"a,y\n" + b"".join(f"{i},{i % 3}\n".encode() for i in range(9))
    response = upload(client, content, label="y")
    assert response.status_code == 413
    assert "MAX_CLASSES" in response.json()["detail"] and "3" in response.json()["detail"]


def test_more_columns_than_the_limit_is_a_413_before_parsing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_upload_columns", 3)
    response = upload(client, b"a,b,c,y\n1,2,3,0\n4,5,6,1\n", label="y")
    assert response.status_code == 413 and "MAX_UPLOAD_COLUMNS" in response.json()["detail"]


def test_a_parse_over_its_memory_is_a_413_naming_the_setting(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "upload_parse_memory_bytes", 256 * 2**20)
    bomb = io.BytesIO()  # 400 MB of zeros in under 1 MB, within MAX_DATASET_VALUES
    np.savez_compressed(bomb, X=np.zeros((500_000, 100)), y=np.arange(500_000) % 2)
    response = upload(client, bomb.getvalue(), "bomb.npz")
    assert response.status_code == 413, response.text
    assert "UPLOAD_PARSE_MEMORY_BYTES" in response.json()["detail"]


def test_a_parse_over_its_time_is_killed_and_a_413_naming_the_setting(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "upload_parse_timeout_s", 0.001)
    response = upload(client, table_csv(rows=20_000, seed=12), label="species")
    assert response.status_code == 413, response.text
    assert "UPLOAD_PARSE_TIMEOUT_S" in response.json()["detail"]


def test_uploads_have_their_own_body_limit_json_bodies_keep_the_small_one(client: TestClient) -> None:
    big = table_csv(rows=30_000, seed=2)
    assert len(big) > settings.max_request_bytes
    assert upload(client, big, label="species").status_code == 201
    padded = b'{"name": "job"' + b" " * settings.max_request_bytes + b"}"
    response = client.post("/v1/jobs", content=padded, headers={"content-type": "application/json"})
    assert response.status_code == 413


# --------------------------------------------------------------------------- what is stored


def test_an_upload_describes_the_data_and_stores_it_normalised(client: TestClient) -> None:
    content = table_csv(seed=3)
    response = upload(client, content, "iris-like.csv", label="species")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["name"] == "iris-like.csv" and dataset["format"] == "csv" and dataset["label"] == "species"
    assert dataset["n_rows"] == 60 and dataset["n_features"] == 3 and dataset["shape"] == [3]
    assert dataset["classes"] == ["setosa", "virginica"] and dataset["n_classes"] == 2
    assert dataset["feature_names"] == ["a", "b", "c"] and dataset["size_bytes"] == len(content)
    assert dataset["sha256"] == hashlib.sha256(content).hexdigest()
    assert client.get(f"/v1/datasets/{dataset['id']}").json() == dataset

    with session_scope() as session:
        arrays = decode_arrays(session.get(Dataset, uuid.UUID(dataset["id"])).data)
    frame = pd.read_csv(io.BytesIO(content))
    assert arrays.x.dtype == np.float32 and arrays.y.dtype == np.int64
    np.testing.assert_allclose(arrays.x, frame[["a", "b", "c"]].to_numpy(), rtol=1e-6)
    assert [arrays.classes[i] for i in arrays.y] == frame["species"].tolist()


def test_the_same_file_twice_is_one_dataset(client: TestClient) -> None:
    content = table_csv(seed=4)
    first = upload(client, content, label="species", name="first")
    again = upload(client, content, "renamed.csv", label="species", name="second")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["name"] == "first"
    listed = [d["id"] for d in client.get("/v1/datasets").json()["items"]]
    assert listed.count(first.json()["id"]) == 1


def test_the_same_file_with_another_label_column_is_another_dataset(client: TestClient) -> None:
    content = b"a,group,kind\n" + b"".join(f"{i},{i % 2},{i % 3}\n".encode() for i in range(30))
    by_group, by_kind = upload(client, content, label="group"), upload(client, content, label="kind")
    assert (by_group.status_code, by_kind.status_code) == (201, 201)
    assert by_group.json()["id"] != by_kind.json()["id"]
    assert by_group.json()["feature_names"] == ["a", "kind"] and by_kind.json()["classes"] == ["0", "1", "2"]


def test_listing_is_newest_first(client: TestClient) -> None:
    older, newer = uploaded(client), uploaded(client)
    ids = [d["id"] for d in client.get("/v1/datasets").json()["items"]]
    assert ids.index(newer["id"]) < ids.index(older["id"])


def test_a_parquet_file_reads_like_a_csv(client: TestClient) -> None:
    frame = pd.read_csv(io.BytesIO(table_csv(seed=9)))
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    response = upload(client, buffer.getvalue(), "table.parquet", label="species")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert (dataset["format"], dataset["n_rows"], dataset["feature_names"]) == ("parquet", 60, ["a", "b", "c"])
    assert dataset["classes"] == ["setosa", "virginica"]


def test_npz_images_and_sequences_keep_their_shape_and_string_labels(client: TestClient) -> None:
    rng = np.random.default_rng(5)
    images = uploaded(client, npz_bytes(X=rng.normal(size=(40, 1, 8, 8)), y=np.array(["cat", "dog"] * 20)), "img.npz")
    assert images["shape"] == [1, 8, 8] and images["classes"] == ["cat", "dog"] and images["label"] is None
    sequences = uploaded(client, npz_bytes(X=rng.normal(size=(40, 12, 3)), y=np.arange(40) % 4), "seq.npz")
    assert sequences["shape"] == [12, 3] and sequences["classes"] == ["0", "1", "2", "3"]


# --------------------------------------------------------------------------- projects


def test_another_projects_dataset_does_not_exist_for_the_caller(client: TestClient) -> None:
    mine = uploaded(client)
    other = bearer(new_key(client, new_project(client))["key"])
    assert client.get(f"/v1/datasets/{mine['id']}", headers=other).status_code == 404
    assert client.delete(f"/v1/datasets/{mine['id']}", headers=other).status_code == 404
    assert mine["id"] not in [d["id"] for d in client.get("/v1/datasets", headers=other).json()["items"]]
    response = client.post("/v1/jobs", json={"dataset": {"id": mine["id"]}}, headers=other)
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["detail"]] == ["dataset.id"]
    # The same bytes in the other project are that project's own dataset.
    content = table_csv(seed=6)
    assert upload(client, content, label="species").status_code == 201
    theirs = upload(client, content, label="species", headers=other)
    assert theirs.status_code == 201 and theirs.json()["project"] != "default"
    assert client.get(f"/v1/datasets/{mine['id']}").status_code == 200  # still there for its owner


def test_a_missing_dataset_is_a_404(client: TestClient) -> None:
    for path in (f"/v1/datasets/{uuid.uuid4()}", "/v1/datasets/not-an-id"):
        assert client.get(path).status_code == 404
        assert client.delete(path).status_code == 404


# --------------------------------------------------------------------------- jobs on uploads


def test_a_job_naming_an_upload_gets_its_metadata_from_the_server(client: TestClient) -> None:
    dataset = uploaded(client)
    lies = {"n_samples": 5, "n_classes": 3, "shape": [1000], "sha256": "0" * 64, "name": "fake"}
    response = client.post("/v1/jobs", json={"dataset": {"id": dataset["id"], "val_fraction": 0.25} | lies,
                                             "epochs": 1})  # fmt: skip
    assert response.status_code == 201, response.text
    spec = response.json()["spec"]["dataset"]
    assert spec == {"id": dataset["id"], "val_fraction": 0.25, "name": dataset["name"], "sha256": dataset["sha256"],
                    "n_samples": 60, "n_classes": 2, "shape": [3]}  # fmt: skip
    client.post(f"/v1/jobs/{response.json()['id']}/cancel")


def test_an_unknown_dataset_id_is_a_422_naming_dataset_id(client: TestClient) -> None:
    for bad in (str(uuid.uuid4()), "not-a-uuid", 42):
        response = client.post("/v1/jobs", json={"dataset": {"id": bad}})
        assert response.status_code == 422, response.text
        assert [d["field"] for d in response.json()["detail"]] == ["dataset.id"]


def test_a_model_that_cannot_read_the_uploads_shape_is_a_422(client: TestClient) -> None:
    tabular = uploaded(client)
    response = client.post("/v1/jobs", json={"dataset": {"id": tabular["id"]}, "model": {"arch": "cnn"}})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["field"] == "model.arch" and "tabular (3 features)" in detail["msg"]
    rng = np.random.default_rng(7)
    images = uploaded(client, npz_bytes(X=rng.normal(size=(40, 1, 4, 4)), y=np.arange(40) % 2), "small.npz")
    three_blocks = {"arch": "cnn", "channels": [8, 8, 8]}  # 4x4 images halve twice at most
    response = client.post("/v1/jobs", json={"dataset": {"id": images["id"]}, "model": three_blocks})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "model.channels"


def test_delete_is_refused_while_a_queued_job_uses_the_dataset(client: TestClient) -> None:
    dataset = uploaded(client)
    job = client.post("/v1/jobs", json={"dataset": {"id": dataset["id"]}, "epochs": 1}).json()
    response = client.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 409
    assert job["id"] in response.json()["detail"] and "queued" in response.json()["detail"]
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 200
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    # The finished job's spec still reads: it carries the dataset's metadata itself.
    assert client.get(f"/v1/jobs/{job['id']}").json()["spec"]["dataset"]["n_samples"] == 60


def test_the_trainer_trains_on_the_uploaded_arrays_as_the_worker_reads_them(client: TestClient) -> None:
    dataset = uploaded(client, table_csv(rows=80, seed=8))
    job = client.post("/v1/jobs", json={"dataset": {"id": dataset["id"]}, "epochs": 5, "batch_size": 16,
                                         "optimizer": {"name": "adam", "lr": 0.01}}).json()  # fmt: skip
    spec = JobSpec.model_validate(job["spec"])  # as the worker does: no database needed for this
    assert isinstance(spec.dataset, UploadedDataset) and spec.split_sizes == (64, 16)
    with session_scope() as session:
        arrays = read_dataset_arrays(session=session, dataset=spec.dataset, project="default")
    result = run_training(spec, raw_data=(arrays.x, arrays.y, arrays.classes))
    assert result.class_names == ["setosa", "virginica"]
    assert result.final_metrics["val_accuracy"] >= 0.9  # the classes are 3 standard deviations apart
    client.post(f"/v1/jobs/{job['id']}/cancel")


def test_the_trainer_refuses_an_upload_without_its_arrays_or_with_other_ones() -> None:
    dataset = {"id": str(uuid.uuid4()), "name": "x", "sha256": "a" * 64, "n_samples": 20, "n_classes": 2,
               "shape": [2]}  # fmt: skip
    spec = JobSpec.model_validate({"dataset": dataset, "epochs": 1})  # no database: the spec carries what it needs
    with pytest.raises(ValueError, match="passed in"):
        run_training(spec)
    x, y = np.zeros((20, 3), np.float32), np.arange(20) % 2
    with pytest.raises(ValueError, match="not the spec's"):
        run_training(spec, raw_data=(x, y, ["a", "b"]))


def test_the_catalog_says_what_a_job_sends_for_an_upload(client: TestClient) -> None:
    entry = client.get("/v1/catalog").json()["uploaded_dataset"]
    assert set(entry["fields"]) == {"id", "val_fraction"} and "POST /v1/datasets" in entry["description"]


def test_a_worker_finds_a_deleted_dataset_gone_and_says_so(client: TestClient) -> None:
    dataset = uploaded(client)
    job = client.post("/v1/jobs", json={"dataset": {"id": dataset["id"]}, "epochs": 1}).json()
    spec = JobSpec.model_validate(job["spec"])
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    with session_scope() as session, pytest.raises(DatasetUnavailable, match="no longer stored"):
        read_dataset_arrays(session=session, dataset=spec.dataset, project="default")


def test_a_dataset_with_neither_name_nor_id_is_told_both_ways(client: TestClient) -> None:
    for dataset in ({}, {"val_fraction": 0.3}, {"name": "penguins"}):
        response = client.post("/v1/jobs", json={"dataset": dataset})
        assert response.status_code == 422
        [detail] = response.json()["detail"]
        assert detail["field"] == "dataset"
        assert "'name'" in detail["msg"] and "'iris'" in detail["msg"] and "'id'" in detail["msg"]
        assert "uploaded" not in detail["msg"].split("(see GET /v1/catalog)")[0]  # the tag is no name to send
