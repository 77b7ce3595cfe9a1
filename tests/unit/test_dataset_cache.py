"""The dataset cache (worker/dataset_cache.py) against a mirror on 127.0.0.1 (no network):
verified once then marked, a bad checksum refused with nothing left that looks complete,
one download for two concurrent workers, and an unreachable mirror failing in seconds."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.dataset_files import dataset_files, write_image_set
from tests.mirror_server import Mirror, serve_mirror
from trainer.image_sets import read_image_set
from worker.dataset_cache import (
    DatasetCache,
    DatasetUnavailable,
    SetChecksums,
    read_checksum_table,
    torchvision_checksums,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def mirror(tmp_path: Path):
    with serve_mirror(tmp_path / "mirror") as served:
        yield served


def mirrored_table(mirror: Mirror, *names: str) -> dict[str, SetChecksums]:
    """The checksum table of the sets the mirror serves: downloads as served, files as extracted
    (the MNIST family keeps its .gz files, as torchvision does)."""
    table = {}
    for name in names:
        downloads = mirror.add(name)
        if name == "cifar10":
            files = {path: hashlib.md5(data).hexdigest() for path, data in dataset_files(name).items()}
        else:
            files = {f"MNIST/raw/{file}": md5 for file, md5 in downloads.items()}
        table[name] = SetChecksums(downloads=downloads, files=files)
    return table


def cache(root: Path, table: dict[str, SetChecksums], mirror: Mirror | None = None, **kwargs) -> DatasetCache:
    return DatasetCache(root=root, table=table, mirror=mirror.url if mirror else "", **kwargs)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".incoming-"))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_missing_set_is_downloaded_verified_and_readable(tmp_path: Path, mirror: Mirror, name: str) -> None:
    root = tmp_path / "cache"
    datasets = cache(root, mirrored_table(mirror, name), mirror)
    assert not datasets.is_ready(name)
    assert datasets.ensure(name) == root
    assert datasets.is_ready(name)
    arrays = read_image_set(name, root)
    assert arrays.x_train.shape[0] == 300 and arrays.x_test.shape[0] == 100
    assert leftovers(root) == []
    if name == "cifar10":  # the archive is not a file of the set: not kept
        assert not (root / "cifar-10-batches-py" / "cifar-10-python.tar.gz").exists()
        assert not (root / "cifar-10-python.tar.gz").exists()


def test_a_copied_set_is_verified_once_then_trusted_by_its_marker(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    written = write_image_set(root, "cifar10")
    datasets = cache(root, {"cifar10": SetChecksums(files=written)}, download=False)
    datasets.ensure("cifar10")
    marker = json.loads((root / ".verified" / "cifar10.json").read_text())
    assert marker["table"] == datasets.checksums("cifar10").digest
    # Same size, other bytes: the marker spares the hashing, so the next ensure does not notice...
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(bytes(reversed(batch.read_bytes())))
    assert datasets.ensure("cifar10") == root
    # ...a file that changed size is noticed without hashing, and verified again: refused.
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(DatasetUnavailable, match="data_batch_1 does not match its checksum"):
        datasets.ensure("cifar10")
    # A new table (a new digest) is verified again too.
    write_image_set(root, "cifar10")
    datasets.ensure("cifar10")
    more = cache(root, {"cifar10": SetChecksums(files=written | {"cifar-10-batches-py/extra": "0" * 32})},
                 download=False)  # fmt: skip
    with pytest.raises(DatasetUnavailable, match="1 of its 8 files are missing \\(cifar-10-batches-py/extra\\)"):
        more.ensure("cifar10")
    reordered = cache(root, {"cifar10": SetChecksums(files=dict(reversed(written.items())))}, download=False)
    assert reordered.checksums("cifar10").digest == datasets.checksums("cifar10").digest  # order does not matter
    assert reordered.is_ready("cifar10")


def test_a_missing_set_without_downloads_fails_with_the_message_the_job_shows(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    datasets = cache(root, torchvision_checksums(), download=False)
    started = time.monotonic()
    with pytest.raises(DatasetUnavailable) as caught:
        datasets.ensure("cifar10")
    assert time.monotonic() - started < 1.0
    assert caught.value.error_type == "dataset_unavailable"
    assert str(caught.value) == (
        f"cifar10 is not in DATASETS_DIR={root} and could not be downloaded: downloads are off "
        "(DATASETS_DOWNLOAD=false); 7 of its 7 files are missing (cifar-10-batches-py/batches.meta, "
        "cifar-10-batches-py/data_batch_1, cifar-10-batches-py/data_batch_2). Fetch it with "
        "python -m api.admin fetch-datasets cifar10 (or copy torchvision's files there)"
    )


def test_a_download_that_does_not_match_the_table_is_refused_and_leaves_nothing(tmp_path: Path, mirror: Mirror) -> None:
    root = tmp_path / "cache"
    table = mirrored_table(mirror, "mnist", "cifar10")
    # The mirror serves other bytes than the table vouches for (a tampered or truncated archive).
    bad_download = {"mnist": table["mnist"].model_copy(update={"downloads": {
        file: "0" * 32 for file in table["mnist"].downloads}})}  # fmt: skip
    with pytest.raises(DatasetUnavailable, match="File not found or corrupted"):
        cache(root, bad_download, mirror).ensure("mnist")
    # The archive is as served, but what it holds is not what the table lists.
    bad_file = {"cifar10": table["cifar10"].model_copy(update={"files": table["cifar10"].files | {
        "cifar-10-batches-py/test_batch": "0" * 32}})}  # fmt: skip
    with pytest.raises(DatasetUnavailable, match="what was downloaded is not the set: .*test_batch does not match"):
        cache(root, bad_file, mirror).ensure("cifar10")
    assert sorted(p.name for p in root.iterdir()) == [".locks"], "no set folder, marker or staging left behind"
    for name, checksums in (("mnist", bad_download["mnist"]), ("cifar10", bad_file["cifar10"])):
        assert not cache(root, {name: checksums}).is_ready(name)


def test_two_workers_ensuring_one_set_download_it_once(tmp_path: Path, mirror: Mirror) -> None:
    root = tmp_path / "cache"
    table = mirrored_table(mirror, "cifar10")
    cache(tmp_path / "alone", table, mirror).ensure("cifar10")
    one_download = dict(mirror.gets)  # torchvision asks twice per file (a redirect probe, then the file)
    mirror.gets.clear()
    mirror.delay_s = 0.5  # the second arrives while the first downloads
    results: list[object] = []

    def ensure() -> None:  # each with its own lock file handle, as two processes would
        try:
            results.append(cache(root, table, mirror).ensure("cifar10"))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)

    workers = [threading.Thread(target=ensure) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
    assert results == [root, root]
    assert mirror.gets == one_download


def test_a_lock_held_too_long_fails_instead_of_hanging(tmp_path: Path) -> None:
    import fcntl

    root = tmp_path / "cache"
    (root / ".locks").mkdir(parents=True)
    with (root / ".locks" / "mnist.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DatasetUnavailable, match="another process has been fetching it"):
            cache(root, torchvision_checksums(), lock_wait_s=0.5).ensure("mnist")


def test_an_unreachable_mirror_fails_in_seconds(tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    silent = socket.socket()  # accepts connections, never answers: only the timeout ends the wait
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        for url, within_s in ((refused_url, 2.0), (silent_url, 4.0)):
            datasets = DatasetCache(root=tmp_path / "cache", table=torchvision_checksums(), mirror=url, timeout_s=1.0)
            started = time.monotonic()
            with pytest.raises(DatasetUnavailable, match="could not be downloaded: " + url):
                datasets.ensure("mnist")
            assert time.monotonic() - started < within_s
            assert not datasets.is_ready("mnist") and leftovers(tmp_path / "cache") == []
    finally:
        silent.close()


def test_a_set_copied_from_a_torchvision_folder(tmp_path: Path) -> None:
    source = tmp_path / "torchvision-root"
    written = write_image_set(source, "mnist")
    datasets = cache(tmp_path / "cache", {"mnist": SetChecksums(files=written)}, download=False)
    datasets.copy_from("mnist", source)
    assert datasets.is_ready("mnist")
    assert np.array_equal(read_image_set("mnist", tmp_path / "cache").y_test, read_image_set("mnist", source).y_test)
    with pytest.raises(DatasetUnavailable, match="does not hold it: 4 of its 4 files are missing"):
        cache(tmp_path / "other", {"mnist": SetChecksums(files=written)}).copy_from("mnist", tmp_path / "nothing")


def test_the_product_table_is_torchvisions_and_a_json_table_replaces_it(tmp_path: Path) -> None:
    table = torchvision_checksums()
    assert set(table) == {"mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100"}
    assert table["mnist"].downloads["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert table["cifar10"].downloads == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
    assert table["cifar10"].files["cifar-10-batches-py/test_batch"] == "40351d587109b95175f43aff81a1287e"
    assert len(table["cifar100"].files) == 3
    product = DatasetCache(root=tmp_path, table=table)  # torchvision's mirrors, or the one DATASETS_MIRROR names
    assert product._urls("mnist", "t10k-images-idx3-ubyte.gz") == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
        "http://yann.lecun.com/exdb/mnist/t10k-images-idx3-ubyte.gz",
    ]
    cifar100 = ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert product._urls("cifar100", "cifar-100-python.tar.gz") == cifar100
    mirrored = DatasetCache(root=tmp_path, table=table, mirror="http://mirror.internal/datasets/")
    assert mirrored._urls("kmnist", "x.gz") == ["http://mirror.internal/datasets/kmnist/x.gz"]
    from jobs.settings import Settings

    assert Settings(descent_home=tmp_path).datasets_dir == tmp_path.resolve() / "datasets"
    assert Settings(descent_home=tmp_path, datasets_dir=tmp_path / "elsewhere").datasets_dir == tmp_path / "elsewhere"
    path = tmp_path / "checksums.json"
    path.write_text(json.dumps({"kmnist": {"files": {"KMNIST/raw/x": "ab" * 16}}}))
    assert read_checksum_table(path) == {"kmnist": SetChecksums(files={"KMNIST/raw/x": "ab" * 16})}
    with pytest.raises(DatasetUnavailable, match="the checksum table has no entry for it"):
        DatasetCache(root=tmp_path, table=read_checksum_table(path)).ensure("mnist")


def test_every_built_in_set_is_a_run_input_with_a_stable_digest_and_its_splits() -> None:
    from jobs.spec import JobSpec
    from worker.mlflow_run import MLFLOW_DIGEST_CHARS, dataset_input

    def recorded(dataset: dict, seed: int = 0) -> tuple[str, dict, dict]:
        spec = JobSpec.model_validate({"dataset": dataset, "seed": seed})
        entity = dataset_input(spec, "default").dataset
        return entity.digest, json.loads(entity.profile), json.loads(entity.source)

    digest, profile, source = recorded({"name": "mnist", "val_fraction": 0.1, "subset": 1000})
    assert digest == torchvision_checksums()["mnist"].digest[:MLFLOW_DIGEST_CHARS]
    assert profile == {"num_rows": 7000, "num_features": 784, "train_samples": 1000, "validation_samples": 6000}
    assert source["builtin"] == "mnist" and source["reader"] == "torchvision"
    assert recorded({"name": "mnist"}, seed=5)[0] == digest  # the files, not the job, make an image set's digest

    moons = recorded({"name": "moons", "n_samples": 500})
    assert moons[1]["train_samples"] == 400 and moons[1]["validation_samples"] == 100
    assert recorded({"name": "moons", "n_samples": 500})[0] == moons[0]
    assert recorded({"name": "moons", "n_samples": 500}, seed=1)[0] != moons[0]  # a generated set follows its seed
    assert recorded({"name": "moons", "n_samples": 501})[0] != moons[0]
    assert recorded({"name": "digits"}, seed=1)[0] == recorded({"name": "digits"})[0]  # a bundled one does not


def admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.admin", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=120, cwd=REPO_ROOT)  # fmt: skip


def test_fetch_datasets_fills_the_cache_from_a_mirror_and_names_what_it_could_not_fetch(
    tmp_path: Path, mirror: Mirror
) -> None:
    table = mirrored_table(mirror, "mnist", "cifar10")
    checksums = tmp_path / "checksums.json"
    checksums.write_text(json.dumps({name: entry.model_dump() for name, entry in table.items()}
                                    | {"kmnist": {"files": {"KMNIST/raw/x": "0" * 32}}}))  # fmt: skip
    root = tmp_path / "cache"
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "DESCENT_HOME": str(tmp_path / "home"),
                        "DATASETS_DIR": str(root), "DATASETS_MIRROR": mirror.url,
                        "DATASETS_CHECKSUMS": str(checksums), "DATASETS_DOWNLOAD": "false"}  # fmt: skip
    fetched = admin(env, "fetch-datasets", "mnist", "cifar10")
    assert fetched.returncode == 0, fetched.stderr
    lines = fetched.stdout.splitlines()
    assert lines[0].startswith(f"mnist: downloaded and verified in {root} (") and lines[1].startswith("cifar10: downl")
    cache = DatasetCache(root=root, table=table)
    assert cache.is_ready("mnist") and cache.is_ready("cifar10")

    again = admin(env, "fetch-datasets", "cifar10", "kmnist", "fashion_mnist")
    assert again.returncode == 1
    assert again.stdout.startswith("cifar10: already verified in")
    assert "kmnist: FAILED: the checksum table lists nothing to download for it" in again.stderr
    assert "fashion_mnist: FAILED: the checksum table has no entry for it" in again.stderr
    assert again.stderr.rstrip().endswith("error: could not fetch kmnist, fashion_mnist")

    source = tmp_path / "copied"
    write_image_set(source, "kmnist")
    env["DATASETS_CHECKSUMS"] = str(tmp_path / "kmnist.json")
    Path(env["DATASETS_CHECKSUMS"]).write_text(json.dumps({"kmnist": {"files": write_image_set(source, "kmnist")}}))
    copied = admin(env, "fetch-datasets", "kmnist", "--from", str(source))
    assert copied.returncode == 0 and copied.stdout.startswith(f"kmnist: copied from {source} and verified"), copied
    assert read_image_set("kmnist", root).x_train.shape == (300, 1, 28, 28)
    assert admin(env, "fetch-datasets", "svhn").returncode == 2  # not a set it knows: argparse says which are


def test_the_admin_command_does_not_import_torch_until_it_fetches() -> None:
    imported = subprocess.run([sys.executable, "-c", "import api.admin, sys; print('torch' in sys.modules)"],
                              env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True,
                              check=False, cwd=REPO_ROOT)  # fmt: skip
    assert imported.stdout.strip() == "False", imported.stderr


def test_the_job_records_the_failure_as_dataset_unavailable(tmp_path: Path) -> None:
    from worker.execute import describe_failure

    unavailable = DatasetUnavailable("mnist", tmp_path, "no route to host")
    assert describe_failure(unavailable) == ("dataset_unavailable", str(unavailable))
    assert describe_failure(ValueError("bad")) == ("ValueError", "bad")
