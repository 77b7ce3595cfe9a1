"""The standard image sets, read through torchvision's dataset classes from the dataset cache.

The trainer never downloads: the worker prepares the cache (worker/dataset_cache.py,
checksums verified there) before the trainer starts, so reading trusts the files it finds.
Arrays come back as stored, uint8 N x C x H x W: they go to the device like that and are
normalised inside the step (trainer/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.vision import datasets


def _trusting(cifar: type[datasets.CIFAR10]) -> type[datasets.CIFAR10]:
    """The CIFAR reader without its md5 checks: torchvision checks every file each time it
    opens the set (~0.3 s); the cache checked them once, against the table it was filled
    with (tests fill it with their own). An md5 of None is torchvision's "exists is enough"."""
    return type(
        cifar.__name__,
        (cifar,),
        {
            "train_list": [[file, None] for file, _ in cifar.train_list],
            "test_list": [[file, None] for file, _ in cifar.test_list],
            "meta": cifar.meta | {"md5": None},
        },
    )


@dataclass(frozen=True)
class ImageSet:
    reader: type[datasets.VisionDataset]  # torchvision's class for the set
    folder: str  # where the class keeps the files, under the cache


IMAGE_SETS: dict[str, ImageSet] = {
    "mnist": ImageSet(datasets.MNIST, "MNIST"),
    "fashion_mnist": ImageSet(datasets.FashionMNIST, "FashionMNIST"),
    "kmnist": ImageSet(datasets.KMNIST, "KMNIST"),
    "cifar10": ImageSet(_trusting(datasets.CIFAR10), "cifar-10-batches-py"),
    "cifar100": ImageSet(_trusting(datasets.CIFAR100), "cifar-100-python"),
}


@dataclass(frozen=True)
class ImageArrays:
    """Both official splits as stored: uint8 images N x C x H x W, int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


def _split(image_set: ImageSet, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = image_set.reader(str(root), train=train, download=False)
    x = np.asarray(data.data)  # MNIST family: a uint8 tensor N x H x W; CIFAR: a numpy N x H x W x C
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.uint8), np.asarray(data.targets, dtype=np.int64), list(data.classes)


def read_image_set(name: str, root: Path) -> ImageArrays:
    """The set `name` from the cache at `root` (torchvision raises RuntimeError when files are missing)."""
    image_set = IMAGE_SETS[name]
    x_train, y_train, classes = _split(image_set, root, train=True)
    x_test, y_test, _ = _split(image_set, root, train=False)
    return ImageArrays(x_train, y_train, x_test, y_test, classes)
