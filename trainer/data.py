"""Datasets: name -> loader, and the split the trainer reads.

The generated and bundled sets (DATASET_LOADERS) return raw features (one row of columns
per sample) and integer labels; reading them as the model's view (jobs/shapes.py),
splitting and standardisation happen once, here, the same way for all of them, and they
go to the device as the model reads them.

The standard image sets (IMAGE_LOADERS: torchvision's files in the dataset cache) are too
large for that: they go to the device as stored, uint8 N x C x H x W (CIFAR's 50k: 150 MB,
as floats 600 MB), and each batch becomes the model's input inside the step
(`SplitData.inputs`): scaled, standardised per channel, reshaped to the view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split

from jobs.shapes import DataShape, ShapeKind
from jobs.spec import ImageDataset, JobSpec, UploadedDataset
from trainer.augment import BatchAugmentation
from trainer.image_sets import IMAGE_SETS, ImageArrays, read_image_set

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
    @cache  # read once a process: parsing digits' CSV costs more than many of its training runs' epochs
    def read() -> RawData:
        bunch = loader()
        names = [str(n) for n in getattr(bunch, "target_names", sorted(set(bunch.target)))]
        return bunch.data.astype(np.float32), bunch.target.astype(np.int64), names

    def load(_spec: object, _seed: int) -> RawData:
        x, y, names = read()
        return x.copy(), y.copy(), list(names)  # copies: whoever reads them may change them

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

# The image sets: name -> (dataset cache directory) -> both official splits as stored.
IMAGE_LOADERS: dict[str, Callable[[Path], ImageArrays]] = {name: partial(read_image_set, name) for name in IMAGE_SETS}

# Seeds of the image sets' two draws, each a stream of its own: the held-out validation split
# does not move when the subset changes (learning curves compare sizes on one validation set).
VALIDATION_STREAM, SUBSET_STREAM = 1, 2


def _check_uploaded(dataset: UploadedDataset, x: np.ndarray, y: np.ndarray, class_names: list[str]) -> None:
    """The arrays are the ones the spec describes (the spec was checked against them at submission)."""
    if len(x) != dataset.n_samples or list(x.shape[1:]) != dataset.shape or len(y) != len(x):
        raise ValueError(
            f"dataset {dataset.id}: arrays X {tuple(x.shape)}, y {tuple(y.shape)} are not the spec's "
            f"{dataset.n_samples} samples of shape {dataset.shape}"
        )
    if len(class_names) != dataset.n_classes or y.min() < 0 or y.max() >= len(class_names):
        raise ValueError(f"dataset {dataset.id}: labels are not codes of the spec's {dataset.n_classes} classes")


class ImageInputs:
    """Stored uint8 images -> what the model reads: scaled to [0, 1], standardised per channel
    with the training samples' statistics, reshaped to the model's view (tabular: flat; image:
    as is; sequence: the rows as steps). Applied to a batch or an evaluation chunk at a time,
    so the whole set never exists as floats."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, shape: DataShape) -> None:
        self.mean, self.std = mean, std  # 1 x C x 1 x 1, in [0, 1] units
        # (x / 255 - mean) / std as one scale and one shift, in place on the batch's float copy.
        self.scale, self.shift = 1 / (255 * std), mean / std
        self.dims = shape.dims

    def __call__(self, x: torch.Tensor, augmentation: BatchAugmentation | None = None) -> torch.Tensor:
        if augmentation is not None:
            x = augmentation.pixels(x)
        x = x.to(torch.float32, copy=True).mul_(self.scale).sub_(self.shift)  # never the stored tensor
        if augmentation is not None:
            x = augmentation.normalised(x)
        return x.reshape(len(x), *self.dims)


@dataclass
class SplitData:
    """Both splits as tensors already on the training device (small data stays there).

    The generated, bundled and uploaded sets are stored as the model reads them, each sample
    shaped as `shape`; an image set is stored as its files hold it (uint8 N x C x H x W) and
    `images` turns stored samples into model inputs. Whoever feeds the model goes through
    `inputs` (evaluation, diagnostics) or `training_inputs` (the step), never x_* directly.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: list[str]
    shape: DataShape  # the view the model reads
    images: ImageInputs | None = None  # None: stored as the model reads them

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples (a batch or a chunk of either split) as the model reads them, not augmented."""
        return x if self.images is None else self.images(x)

    def training_inputs(self, x: torch.Tensor, augmentation: BatchAugmentation | None) -> torch.Tensor:
        """A training batch as the model reads it, augmented when the job asks."""
        return x if self.images is None else self.images(x, augmentation)

    @property
    def n_features(self) -> int:
        """Values per sample, flat."""
        return self.x_train[0].numel()

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


def load_split(
    spec: JobSpec, device: torch.device, raw: RawData | None = None, datasets_dir: Path | None = None
) -> SplitData:
    """`raw` holds an uploaded dataset's arrays (the caller reads them from wherever they
    are kept); an image set is read from the dataset cache at `datasets_dir` (the worker
    fills it beforehand); a built-in dataset is generated or loaded here by name."""
    if isinstance(spec.dataset, ImageDataset):
        return _load_image_split(spec, spec.dataset, device, datasets_dir)
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


def stratified_choice(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of n samples drawn with each class's share of `labels` (largest
    remainders; every class at least once when n allows), at random within each class."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[: n - quota.sum()]] += 1
    if n >= len(classes):
        for rare in np.flatnonzero(quota == 0):  # a class too rare to round up gets one from the largest
            quota[np.argmax(quota)] -= 1
            quota[rare] = 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def channel_statistics(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 N x C x H x W, in [0, 1] units, shaped 1 x C x 1 x 1:
    exact, from per-channel counts of the 256 pixel values, a chunk of samples at a time
    (no float copy of the set)."""
    channels = x.shape[1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(x), chunk):
        for c in range(channels):
            counts[c] += np.bincount(x[start : start + chunk, c].ravel(), minlength=256)
    values = np.arange(256) / 255.0
    total = counts.sum(axis=1)
    mean = counts @ values / total
    std = np.sqrt((counts * (values - mean[:, None]) ** 2).sum(axis=1) / total)
    std[std == 0] = 1.0  # a blank channel stays at 0
    shape = (1, channels, 1, 1)
    return mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32)


def _load_image_split(
    spec: JobSpec, dataset: ImageDataset, device: torch.device, datasets_dir: Path | None
) -> SplitData:
    """Validation: the official test split, or a stratified hold-out of the official training
    split; then the training samples: all that remain, or a stratified subset of them."""
    if datasets_dir is None:
        raise ValueError(
            f"dataset {dataset.name} is read from the dataset cache: datasets_dir must name it (DATASETS_DIR)"
        )
    arrays = IMAGE_LOADERS[dataset.name](Path(datasets_dir))
    # spec.split_sizes when the files hold the official sets (test files are smaller).
    n_train, n_val = dataset.sizes_of(len(arrays.y_train), len(arrays.y_test))
    remaining = np.arange(len(arrays.y_train))
    if dataset.val_fraction is None:
        x_val, y_val = arrays.x_test, arrays.y_test
    else:
        held_out = stratified_choice(arrays.y_train, n_val, np.random.default_rng([spec.seed, VALIDATION_STREAM]))
        x_val, y_val = arrays.x_train[held_out], arrays.y_train[held_out]
        remaining = np.setdiff1d(remaining, held_out, assume_unique=True)
    if dataset.subset is not None:
        if dataset.subset > len(remaining):
            raise ValueError(f"subset {dataset.subset} is more than the {len(remaining)} training samples in the cache")
        rng = np.random.default_rng([spec.seed, SUBSET_STREAM])
        remaining = remaining[stratified_choice(arrays.y_train[remaining], dataset.subset, rng)]
    if len(remaining) == len(arrays.y_train):
        x_train, y_train = arrays.x_train, arrays.y_train  # all of it: no copy
    else:
        x_train, y_train = arrays.x_train[remaining], arrays.y_train[remaining]
    assert (len(y_train), len(y_val)) == (n_train, n_val), "the split disagrees with the spec's sizes"
    mean, std = channel_statistics(x_train)  # the training samples used: validation stays unseen

    def to_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    shape = spec.input_shape
    return SplitData(
        to_device(x_train),
        to_device(y_train),
        to_device(x_val),
        to_device(y_val),
        arrays.classes,
        shape,
        ImageInputs(to_device(mean), to_device(std), shape),
    )
