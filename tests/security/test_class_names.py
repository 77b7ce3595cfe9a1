"""Issue 14, item 6: class names copied into every spec, against the real stack.

Two 2 MB class names made every job spec ~4 MB and `GET /v1/jobs?limit=10` 40 MB. Class names
are capped (MAX_CLASS_NAME_CHARS) and counted (MAX_CLASSES) at upload, they stay with the
dataset (a spec counts them), and the confusion plot of a job on many classes stays bounded.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import Stack
from tests.security.conftest import Tenant

# The stack runs with the default limits (jobs/settings.py); spelled out so that this file
# also runs, and fails, against code that has no such settings.
MAX_CLASSES = 1000
MAX_CLASS_NAME_CHARS = 100


def labelled_csv(names: list[str], per_class: int = 2) -> bytes:
    """Two numeric features and a label column holding each name `per_class` times."""
    rng = np.random.default_rng(0)
    lines = ["a,b,label"]
    for i, name in enumerate(names):
        for _ in range(per_class):
            a, b = rng.normal(size=2) + i
            lines.append(f"{a:.3f},{b:.3f},{name}")
    return ("\n".join(lines) + "\n").encode()


def refusal(response) -> str:  # noqa: ANN001
    body = response.json()
    return body["detail"] if isinstance(body["detail"], str) else body["detail"][0]["msg"]


def wait(tenant: Tenant, job_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while (job := tenant.api.get(f"/v1/jobs/{job_id}").json())["status"] not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout_s} s"
        time.sleep(0.5)
    return job


@pytest.fixture(scope="module")
def tenant(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant("classes")


def test_the_limits_here_are_the_defaults() -> None:
    from jobs.settings import Settings

    assert (Settings().max_classes, Settings().max_class_name_chars) == (MAX_CLASSES, MAX_CLASS_NAME_CHARS)


def test_two_class_names_of_two_megabytes_are_refused_at_upload(tenant: Tenant) -> None:
    huge = ["a" * 2_000_000, "b" * 2_000_000]
    response = tenant.api.post("/v1/datasets", files={"file": ("huge-names.csv", labelled_csv(huge))},
                               data={"label": "label"})  # fmt: skip
    assert response.status_code == 413, response.text[:500]
    assert "2,000,000 characters" in refusal(response) and "MAX_CLASS_NAME_CHARS" in refusal(response)
    # An NPZ says how wide its text labels are in y's header: refused before y is read.
    buffer = io.BytesIO()
    np.savez(buffer, X=np.zeros((4, 2)), y=np.array(huge * 2))
    response = tenant.api.post("/v1/datasets", files={"file": ("huge-names.npz", buffer.getvalue())})
    assert response.status_code == 413, response.text[:500]
    assert "MAX_CLASS_NAME_CHARS" in refusal(response)


def test_more_classes_than_the_limit_are_refused_at_upload(tenant: Tenant) -> None:
    names = [f"k{i}" for i in range(MAX_CLASSES + 1)]
    response = tenant.api.post("/v1/datasets", files={"file": ("many.csv", labelled_csv(names))},
                               data={"label": "label"})  # fmt: skip
    assert response.status_code == 413, response.text[:500]
    assert f"{MAX_CLASSES + 1:,}" in refusal(response) and "MAX_CLASSES" in refusal(response)


def test_job_specs_count_the_classes_and_the_names_stay_with_the_dataset(tenant: Tenant) -> None:
    # 50 names as long as the limit allows: 5 KB of names, in the dataset only.
    names = [f"{i:03d}-" + "n" * (MAX_CLASS_NAME_CHARS - 4) for i in range(50)]
    uploaded = tenant.api.post("/v1/datasets", files={"file": ("long-names.csv", labelled_csv(names, 4))},
                               data={"label": "label"})  # fmt: skip
    assert uploaded.status_code == 201, uploaded.text[:500]
    dataset = uploaded.json()
    assert dataset["classes"] == sorted(names) and dataset["n_classes"] == 50
    jobs = []
    for i in range(3):
        job = tenant.api.post("/v1/jobs", json={"name": f"names-{i}", "dataset": {"id": dataset["id"],
                                                "val_fraction": 0.5}, "epochs": 1})  # fmt: skip
        assert job.status_code == 201, job.text[:500]
        jobs.append(job.json())
        tenant.api.post(f"/v1/jobs/{job.json()['id']}/cancel")
    assert jobs[0]["spec"]["dataset"]["n_classes"] == 50 and "classes" not in jobs[0]["spec"]["dataset"]
    listing = tenant.api.get("/v1/jobs", params={"limit": 10})
    assert listing.status_code == 200
    assert names[0] not in listing.text  # not a copy per job
    assert len(listing.content) < 10 * 8_000, len(listing.content)


def test_a_job_on_many_classes_logs_a_bounded_confusion_plot(stack: Stack, tenant: Tenant, tmp_path: Path) -> None:
    classes = 200
    uploaded = tenant.api.post("/v1/datasets", files={"file": ("many-classes.csv",
                               labelled_csv([f"class-{i}" for i in range(classes)], 4))},
                               data={"label": "label"})  # fmt: skip
    assert uploaded.status_code == 201, uploaded.text[:500]
    job = tenant.api.post("/v1/jobs", json={"name": "many-classes", "epochs": 1, "batch_size": 400,
                                            "dataset": {"id": uploaded.json()["id"], "val_fraction": 0.5}})  # fmt: skip
    assert job.status_code == 201, job.text[:500]
    done = wait(tenant, job.json()["id"])
    assert done["status"] == "succeeded", done["error"]
    run_id = done["mlflow"]["run_id"]
    matrix = json.loads(Path(stack.mlflow.download_artifacts(run_id, "confusion_matrix.json", str(tmp_path))).read_text(
        encoding="utf-8"
    ))
    assert len(matrix["labels"]) == classes and len(matrix["matrix"]) == classes  # every count is kept
    with Image.open(stack.mlflow.download_artifacts(run_id, "confusion_matrix.png", str(tmp_path))) as plot:
        width, height = plot.size
    # 0.45 inch a class was a 92-inch, 9,200-pixel square with 40,000 numbers in it.
    assert max(width, height) <= 1700, (width, height)
