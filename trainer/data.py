"""Datasets: name -> loader. Every loader returns raw features and integer labels;
splitting and standardisation happen once, here, the same way for all of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from jobs.spec import JobSpec

RawData = tuple[np.ndarray, np.ndarray, list[str]]  # features, labels 0..C-1, class names


def _bundled(loader: Callable) -> Callable[[object, int], RawData]:
    def load(_spec: object, _seed: int) -> RawData:
        bunch = loader()
        names = [str(n) for n in getattr(bunch, "target_names", sorted(set(bunch.target)))]
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64), names

    return load


def _moons(spec, seed: int) -> RawData:  # noqa: ANN001
    x, y = sk_datasets.make_moons(n_samples=spec.n_samples, noise=spec.noise, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64), ["0", "1"]


def _blobs(spec, seed: int) -> RawData:  # noqa: ANN001
    x, y = sk_datasets.make_blobs(
        n_samples=spec.n_samples,
        centers=spec.classes,
        n_features=spec.features,
        cluster_std=spec.noise,
        random_state=seed,
    )
    return x.astype(np.float32), y.astype(np.int64), [str(c) for c in range(spec.classes)]


def _spirals(spec, seed: int) -> RawData:  # noqa: ANN001
    """`arms` interleaved spirals; radius grows with the angle, noise is added in 2-D."""
    rng = np.random.default_rng(seed)
    labels = np.arange(spec.n_samples) % spec.arms
    t = rng.uniform(0.0, 1.0, spec.n_samples)
    angle = 3 * np.pi * t + 2 * np.pi * labels / spec.arms
    radius = 0.2 + t
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x += rng.normal(0.0, spec.noise * 0.1, x.shape)
    return x.astype(np.float32), labels.astype(np.int64), [str(c) for c in range(spec.arms)]


DATASET_LOADERS: dict[str, Callable[[object, int], RawData]] = {
    "digits": _bundled(sk_datasets.load_digits),
    "iris": _bundled(sk_datasets.load_iris),
    "wine": _bundled(sk_datasets.load_wine),
    "breast_cancer": _bundled(sk_datasets.load_breast_cancer),
    "moons": _moons,
    "blobs": _blobs,
    "spirals": _spirals,
}


@dataclass
class SplitData:
    """Both splits as tensors already on the training device (small data stays there)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: list[str]

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def load_split(spec: JobSpec, device: torch.device) -> SplitData:
    x, y, class_names = DATASET_LOADERS[spec.dataset.name](spec.dataset, spec.seed)
    n_train, n_val = spec.split_sizes
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=n_val, stratify=y, random_state=spec.seed
    )
    # Statistics from the training split only: the validation split stays unseen.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # constant features (digits' blank border pixels) stay at 0
    x_train = (x_train - mean) / std
    x_val = (x_val - mean) / std

    def to_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return SplitData(to_device(x_train), to_device(y_train), to_device(x_val), to_device(y_val), class_names)
