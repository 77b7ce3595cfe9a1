"""The standard image sets through the real stack: a worker that lacks a set and may not
download it fails the job at once, as `dataset_unavailable`, never retried; a set placed in
DATASETS_DIR (torchvision's files, checked against the stack's own checksum table) trains;
`python -m api.admin fetch-datasets` fills the cache from a mirror on 127.0.0.1 (no network),
after which the set that was missing trains too, its MLflow run naming the set by digest.

The two tests that train need the trainer's image-set loader (branch of issue 11's trainer
side); on a branch without it they fail at `trainer.setup()`, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from launcher.stack import stack_env
from tests.dataset_files import write_image_set
from tests.integration.conftest import ADMIN_KEY, Stack, running_stack, stack_settings
from tests.mirror_server import Mirror, serve_mirror
from worker.dataset_cache import SetChecksums

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Iterator[Mirror]:
    with serve_mirror(tmp_path_factory.mktemp("mirror")) as served:
        yield served


@pytest.fixture(scope="module")
def image_stack(make_database, tmp_path_factory, mirror: Mirror) -> Iterator[Stack]:
    """A stack whose workers may not download (DATASETS_DOWNLOAD=false) and whose checksum table
    is this test's: mnist as the mirror serves it, kmnist as placed in the cache below."""
    home = tmp_path_factory.mktemp("descent-images")
    downloads = mirror.add("mnist")
    table = {
        "mnist": SetChecksums(downloads=downloads, files={f"MNIST/raw/{file}": md5 for file, md5 in downloads.items()}),
        "kmnist": SetChecksums(files=write_image_set(home / "datasets", "kmnist")),
    }
    checksums = home / "checksums.json"
    checksums.write_text(json.dumps({name: entry.model_dump() for name, entry in table.items()}))
    settings = stack_settings(make_database, home, "descent_images", bootstrap_key=ADMIN_KEY, lease_s=3.0,
                              reaper_interval_s=1.0, datasets_dir=home / "datasets", datasets_download=False,
                              datasets_checksums=checksums, datasets_mirror=mirror.url)  # fmt: skip
    with running_stack(settings, home, workers=1, concurrency=1) as (group, api):
        yield Stack(settings, group, api, MlflowClient(settings.mlflow_tracking_uri), None)


def image_job(name: str, dataset: str) -> dict:
    return {"name": name, "dataset": {"name": dataset, "subset": 200}, "model": {"arch": "mlp"}, "epochs": 3,
            "batch_size": 50, "optimizer": {"name": "adam", "lr": 0.003}}  # fmt: skip


def test_a_missing_set_fails_the_job_at_once_as_dataset_unavailable(image_stack: Stack) -> None:
    submitted = time.monotonic()
    job = image_stack.submit(image_job("it-mnist-missing", "mnist"))
    done = image_stack.wait(job["id"], timeout_s=60)
    took = time.monotonic() - submitted
    datasets_dir = image_stack.settings.datasets_dir
    assert done["status"] == "failed", done
    assert done["error"]["type"] == "dataset_unavailable"
    assert done["error"]["message"] == (
        f"mnist is not in DATASETS_DIR={datasets_dir} and could not be downloaded: downloads are off "
        "(DATASETS_DOWNLOAD=false); 4 of its 4 files are missing (MNIST/raw/t10k-images-idx3-ubyte.gz, "
        "MNIST/raw/t10k-labels-idx1-ubyte.gz, MNIST/raw/train-images-idx3-ubyte.gz). Fetch it with "
        "python -m api.admin fetch-datasets mnist (or copy torchvision's files there)"
    )
    assert took < 15, f"the job took {took:.1f} s to fail"
    print(f"submit -> failed (dataset_unavailable): {took:.2f} s")
    time.sleep(3 * image_stack.settings.reaper_interval_s)  # a reaper pass or three: nothing retries it
    again = image_stack.get(job["id"])
    assert (again["status"], again["attempts"]) == ("failed", 1), again


def test_a_set_placed_in_the_cache_trains(image_stack: Stack) -> None:  # needs the trainer's image-set loader
    job = image_stack.submit(image_job("it-kmnist-placed", "kmnist"))
    done = image_stack.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["val_accuracy"] > 0.5  # ten classes; the fixture's classes light their own pixels
    run = image_stack.mlflow.get_run(done["mlflow"]["run_id"])
    [recorded] = run.inputs.dataset_inputs
    assert recorded.dataset.name == "kmnist"
    table = json.loads(Path(image_stack.settings.datasets_checksums).read_text())
    assert recorded.dataset.digest == SetChecksums(**table["kmnist"]).digest[: len(recorded.dataset.digest)]
    assert json.loads(recorded.dataset.profile)["train_samples"] == 200


def test_fetch_datasets_fills_the_cache_and_the_missing_set_then_trains(image_stack: Stack) -> None:
    env = stack_env(image_stack.settings) | {"PYTHONPATH": str(REPO_ROOT)}
    fetched = subprocess.run([sys.executable, "-m", "api.admin", "fetch-datasets", "mnist"], env=env,
                             capture_output=True, text=True, check=False, timeout=120, cwd=REPO_ROOT)  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.startswith(f"mnist: downloaded and verified in {image_stack.settings.datasets_dir}")
    assert os.path.isfile(image_stack.settings.datasets_dir / "MNIST" / "raw" / "train-images-idx3-ubyte")
    # Needs the trainer's image-set loader from here on.
    job = image_stack.submit(image_job("it-mnist-fetched", "mnist"))
    done = image_stack.wait(job["id"], timeout_s=180)
    assert done["status"] == "succeeded", done["error"]


def test_a_toy_set_is_a_run_input_too(image_stack: Stack) -> None:
    job = image_stack.submit({"name": "it-moons-input", "dataset": {"name": "moons", "n_samples": 200}, "epochs": 2,
                              "seed": 3})  # fmt: skip
    done = image_stack.wait(job["id"], timeout_s=120)
    assert done["status"] == "succeeded", done["error"]
    [recorded] = image_stack.mlflow.get_run(done["mlflow"]["run_id"]).inputs.dataset_inputs
    assert (recorded.dataset.name, recorded.dataset.source_type) == ("moons", "descent")
    source = json.loads(recorded.dataset.source)
    assert (source["seed"], source["spec"]["n_samples"]) == (3, 200)
    assert json.loads(recorded.dataset.profile) == {"num_rows": 200, "num_features": 2, "train_samples": 160,
                                                    "validation_samples": 40}  # fmt: skip
    assert {t.key: t.value for t in recorded.tags}["mlflow.data.context"] == "training"
