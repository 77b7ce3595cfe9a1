"""Small image sets written in the real on-disk formats, for tests (no network).

`write_image_set` lays out the files as torchvision's dataset classes read them from a
dataset cache (the MNIST family's IDX files under `<Class>/raw/`, CIFAR's pickled
batches under `cifar-10-batches-py/` or `cifar-100-python/`); `write_archives` writes what
a download mirror serves (the MNIST family's four .gz files, CIFAR's .tar.gz). Images are
learnable: each class lights its own block of pixels, over noise, so a few epochs of a
small model get well above chance.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

MNIST_FAMILY = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}
CIFAR = {"cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"), "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz")}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def images(n: int, classes: int, channels: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, channels, side, side) uint8 images and their labels, every class present."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    pixels = rng.integers(0, 96, size=(n, channels, side, side)).astype(np.int64)
    cells = int(np.ceil(np.sqrt(classes)))
    block = side // cells
    for c in range(classes):
        row, col = divmod(c, cells)
        pixels[labels == c, :, row * block : (row + 1) * block, col * block : (col + 1) * block] += 150
    return np.clip(pixels, 0, 255).astype(np.uint8), labels


def _idx(array: np.ndarray) -> bytes:
    """IDX format: magic (0, 0, type 0x08 = unsigned byte, number of dims), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _idx_files(n_train: int, n_test: int, seed: int) -> dict[str, bytes]:
    x_train, y_train = images(n_train, 10, 1, 28, seed)
    x_test, y_test = images(n_test, 10, 1, 28, seed + 1)
    arrays = (x_train[:, 0], y_train, x_test[:, 0], y_test)
    return {name: _idx(array) for name, array in zip(IDX_FILES, arrays)}


def _cifar_files(name: str, n_train: int, n_test: int, seed: int) -> dict[str, bytes]:
    classes = 10 if name == "cifar10" else 100
    x_train, y_train = images(n_train, classes, 3, 32, seed)
    x_test, y_test = images(n_test, classes, 3, 32, seed + 1)
    label_key = "labels" if classes == 10 else "fine_labels"

    def batch(x: np.ndarray, y: np.ndarray) -> bytes:
        # As the originals: rows of 3072 bytes (the red plane, then green, then blue), labels a list.
        return pickle.dumps({"data": x.reshape(len(x), -1), label_key: y.tolist()})

    names = [f"class_{c}" for c in range(classes)]
    if classes == 10:
        parts = np.array_split(np.arange(n_train), 5)
        files = {f"data_batch_{i + 1}": batch(x_train[p], y_train[p]) for i, p in enumerate(parts)}
        return files | {"test_batch": batch(x_test, y_test), "batches.meta": pickle.dumps({"label_names": names})}
    meta = pickle.dumps({"fine_label_names": names, "coarse_label_names": [f"super_{c}" for c in range(20)]})
    return {"train": batch(x_train, y_train), "test": batch(x_test, y_test), "meta": meta}


def dataset_files(name: str, n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, bytes]:
    """{path under the dataset cache: content} of the extracted files torchvision reads."""
    if name in MNIST_FAMILY:
        return {f"{MNIST_FAMILY[name]}/raw/{file}": data for file, data in _idx_files(n_train, n_test, seed).items()}
    folder, _ = CIFAR[name]
    return {f"{folder}/{file}": data for file, data in _cifar_files(name, n_train, n_test, seed).items()}


def write_image_set(root: Path, name: str, n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Write the set's files under `root` (a DATASETS_DIR); returns {path: md5} of what was written."""
    written = {}
    for path, data in dataset_files(name, n_train, n_test, seed).items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written[path] = hashlib.md5(data).hexdigest()
    return written


def write_archives(directory: Path, name: str, n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Write what a mirror serves for the set into `directory`; returns {file name: md5}."""
    directory.mkdir(parents=True, exist_ok=True)
    served: dict[str, bytes] = {}
    if name in MNIST_FAMILY:
        for file, data in _idx_files(n_train, n_test, seed).items():
            served[f"{file}.gz"] = gzip.compress(data, mtime=0)
    else:
        folder, archive = CIFAR[name]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for file, data in _cifar_files(name, n_train, n_test, seed).items():
                info = tarfile.TarInfo(f"{folder}/{file}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        served[archive] = buffer.getvalue()
    for file, data in served.items():
        (directory / file).write_bytes(data)
    return {file: hashlib.md5(data).hexdigest() for file, data in served.items()}
