"""Datasets: name -> loader. Every loader returns raw features (one row of columns per
sample) and integer labels; reading them as the model's view (jobs/shapes.py),
splitting and standardisation happen once, here, the same way for all of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from jobs.shapes import DataShape, ShapeKind
from jobs.spec import JobSpec, UploadedDataset

# features (float32, or int64 token ids), labels 0..C-1, class names
RawData = tuple[np.ndarray, np.ndarray, list[str]]

# Standardisation reduces over every axis but the feature one: per feature for tabular
# data, per channel for images, per step feature (over samples and time) for sequences.
STANDARDISED_AXES: dict[ShapeKind, tuple[int, ...]] = {
    ShapeKind.tabular: (0,),
    ShapeKind.image: (0, 2, 3),
    ShapeKind.sequence: (0, 1),
}


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


def _balanced_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    # Equal class counts (to within one): the stratified split always finds every class.
    return rng.permutation(np.arange(n) % classes)


def _sequence_memory(spec, seed: int) -> RawData:  # noqa: ANN001
    """Step 0 holds the class token (id < classes); every later step a random distractor token."""
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, spec.n_samples, spec.classes)
    tokens = rng.integers(spec.classes, spec.vocab, size=(spec.n_samples, spec.length))
    tokens[:, 0] = labels
    return tokens.astype(np.int64), labels.astype(np.int64), [str(c) for c in range(spec.classes)]


def _sequence_parity(spec, seed: int) -> RawData:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, spec.n_samples, 2)
    bits = rng.integers(0, 2, size=(spec.n_samples, spec.length))
    # Flipping one random bit of each sequence with the wrong parity balances the classes
    # and leaves each class uniform over all the sequences of its parity.
    wrong = np.flatnonzero(bits.sum(axis=1) % 2 != labels)
    bits[wrong, rng.integers(0, spec.length, len(wrong))] ^= 1
    return bits.astype(np.int64), labels.astype(np.int64), ["even", "odd"]


DATASET_LOADERS: dict[str, Callable[[object, int], RawData]] = {
    "digits": _bundled(sk_datasets.load_digits),
    "iris": _bundled(sk_datasets.load_iris),
    "wine": _bundled(sk_datasets.load_wine),
    "breast_cancer": _bundled(sk_datasets.load_breast_cancer),
    "moons": _moons,
    "blobs": _blobs,
    "spirals": _spirals,
    "sequence_memory": _sequence_memory,
    "sequence_parity": _sequence_parity,
}


def _check_uploaded(dataset: UploadedDataset, x: np.ndarray, y: np.ndarray, class_names: list[str]) -> None:
    """The arrays are the ones the spec describes (the spec was checked against them at submission)."""
    if len(x) != dataset.n_samples or list(x.shape[1:]) != dataset.shape or len(y) != len(x):
        raise ValueError(
            f"dataset {dataset.id}: arrays X {tuple(x.shape)}, y {tuple(y.shape)} are not the spec's "
            f"{dataset.n_samples} samples of shape {dataset.shape}"
        )
    if len(class_names) != dataset.n_classes or y.min() < 0 or y.max() >= len(class_names):
        raise ValueError(f"dataset {dataset.id}: labels are not codes of the spec's {dataset.n_classes} classes")


@dataclass
class SplitData:
    """Both splits as tensors already on the training device (small data stays there),
    each sample shaped as `shape` (the view the model reads)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: list[str]
    shape: DataShape

    @property
    def n_features(self) -> int:
        """Values per sample, flat."""
        return self.x_train[0].numel()

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def load_split(spec: JobSpec, device: torch.device, raw: RawData | None = None) -> SplitData:
    """`raw` holds an uploaded dataset's arrays (the caller reads them from wherever they
    are kept); a built-in dataset is generated or loaded here by name."""
    if isinstance(spec.dataset, UploadedDataset):
        if raw is None:
            raise ValueError(f"dataset {spec.dataset.id} is an upload: its arrays must be passed in (raw)")
        x, y, class_names = raw
        _check_uploaded(spec.dataset, x, y, class_names)
    else:
        x, y, class_names = DATASET_LOADERS[spec.dataset.name](spec.dataset, spec.seed)
    shape = spec.input_shape
    x = x.reshape(len(x), *shape.dims)  # row-major: digits' 64 pixels become 8 rows of 8
    n_train, n_val = spec.split_sizes
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=n_val, stratify=y, random_state=spec.seed
    )
    if not shape.tokens:  # token ids are names, not quantities: never scaled
        # Statistics from the training split only: the validation split stays unseen.
        axes = STANDARDISED_AXES[shape.kind]
        mean = x_train.mean(axis=axes, keepdims=True)
        std = x_train.std(axis=axes, keepdims=True)
        std[std == 0] = 1.0  # constant features (digits' blank border pixels) stay at 0
        x_train = (x_train - mean) / std
        x_val = (x_val - mean) / std

    def to_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return SplitData(
        to_device(x_train), to_device(y_train), to_device(x_val), to_device(y_val), class_names, shape
    )
