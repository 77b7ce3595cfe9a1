"""An uploaded dataset file, from the bytes that arrive to the form workers read: the types,
the checks every format shares, and the stored form (encode / decode).

A file is received to disk (receive_file: counted and hashed, never held in memory), read
by jobs.upload_readers inside the bounded child process of jobs.upload_sandbox, and stored
normalised: float32 X, int64 labels 0..C-1 and the class names, the only form workers read.
Every refusal is an UploadRejected that names the problem (and the setting, for a limit).

Torch- and SQL-free: the API imports it. pandas is imported where labels are text.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

import numpy as np

from jobs.settings import Settings

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet", "npz": "NPZ"}
ACCEPTED = "CSV (.csv) or Parquet (.parquet) with a label column, or NumPy NPZ (.npz) with arrays X and y"
SHOWN = 20  # names listed in a message before "..."
COPY_CHUNK = 1 << 20


class UploadRejected(ValueError):
    """A file that cannot become a dataset: `field` is the form field at fault, `status` the HTTP answer."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


def over_limit(what: str, value: int, limit: int, setting: str) -> UploadRejected:
    """A 413 naming the server setting that the file goes over."""
    return UploadRejected("file", f"{what}: {value:,}, over this server's limit of {limit:,} ({setting})", status=413)


@dataclass(frozen=True)
class UploadedArrays:
    """A dataset as the trainer reads it: x is (n, *shape) float32, y int64 in 0..C-1."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    feature_names: list[str] | None = None

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.x.shape[1:]]


@dataclass(frozen=True)
class ReceivedFile:
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ParsedUpload:
    """What the API keeps of a parsed upload: the description and the stored form (an
    encoded NPZ), never the arrays themselves."""

    format: str
    sha256: str
    size_bytes: int
    n_rows: int
    shape: list[int]
    classes: list[str]
    feature_names: list[str] | None
    stored: bytes


def listing(names: list[str]) -> str:
    shown = ", ".join(repr(str(n)[:60]) for n in names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def receive_file(stream: BinaryIO, path: Path, limits: Settings) -> ReceivedFile:
    """Copy the upload to `path` in chunks, hashing as it goes; a file over MAX_UPLOAD_BYTES
    is refused at the first byte too many, an empty one at once."""
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as out:
        while chunk := stream.read(COPY_CHUNK):
            size += len(chunk)
            if size > limits.max_upload_bytes:
                raise UploadRejected(
                    "file", f"the file (over {limits.max_upload_bytes:,} bytes) is over this server's limit of "
                    f"{limits.max_upload_bytes:,} bytes (MAX_UPLOAD_BYTES)", status=413,
                )  # fmt: skip
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise UploadRejected("file", "the file is empty")
    return ReceivedFile(path, size, digest.hexdigest())


def file_format(filename: str | None, head: bytes) -> str:
    """The format by extension; a file without one by its first bytes."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    if suffix:
        raise UploadRejected("file", f"unsupported file type '{suffix}'; accepted: {ACCEPTED}", status=415)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"PK"):
        return "npz"
    return "csv"


# --------------------------------------------------------------------------- shared checks


def to_float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf, refused below
        return np.ascontiguousarray(x, dtype=np.float32)


def check_finite(x: np.ndarray, names: list[str] | None, sample_shape: tuple[int, ...] = ()) -> None:
    """x is (n, values) float32; NaN and inf (also values beyond float32's range) are refused, by column."""
    if np.isfinite(x).all():  # the common case, with one temporary of a byte per value
        return
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    per_column = bad.sum(axis=0)
    worst = [int(i) for i in np.flatnonzero(per_column)]
    if names is not None:
        where = ", ".join(f"'{names[i]}': {int(per_column[i])}" for i in worst[:SHOWN])
    else:  # sequences and images: the position within a sample
        where = ", ".join(f"X[:, {', '.join(map(str, np.unravel_index(i, sample_shape)))}]: {int(per_column[i])}"
                          for i in worst[:SHOWN])  # fmt: skip
    more = f", ... ({len(worst)} columns in all)" if len(worst) > SHOWN else ""
    raise UploadRejected("file", f"the features hold {count} NaN or infinite values (by column: {where}{more})")


def check_class_count(count: int, limits: Settings) -> None:
    if count > limits.max_classes:
        raise over_limit("the labels' classes", count, limits.max_classes, "MAX_CLASSES")


def encode_labels(labels: object, limits: Settings) -> tuple[np.ndarray, list[str]]:
    """Labels (numbers, text, a pandas Categorical) -> codes 0..C-1 and the class names in
    code order: numbers in numeric order, text in text order. Text labels are reduced to
    their distinct values first, so that the class count and each name's length are checked
    before any label is widened to the longest one (a 2 MB name in every row)."""
    array = labels if isinstance(labels, np.ndarray) else None
    if array is not None and array.dtype.kind in "biuf":
        values, codes = np.unique(array, return_inverse=True)
        check_class_count(len(values), limits)
        names = [str(v.item()) for v in values]
    else:
        import pandas as pd

        codes, uniques = pd.factorize(labels, sort=False)
        check_class_count(len(uniques), limits)
        raw = list(uniques)
        names = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw]
        longest = max(range(len(names)), key=lambda i: len(names[i]))
        if len(names[longest]) > limits.max_class_name_chars:
            raise UploadRejected(
                "file", f"a class name is {len(names[longest]):,} characters long ({names[longest][:40]!r}...), over "
                f"this server's limit of {limits.max_class_name_chars:,} (MAX_CLASS_NAME_CHARS)", status=413,
            )  # fmt: skip
        order = sorted(range(len(names)), key=lambda i: names[i])
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes, names = rank[codes], [names[i] for i in order]
    if len(set(names)) != len(names):  # 1 and 1.0 in one column, say
        raise UploadRejected("file", f"the labels' names are ambiguous: {listing(names)}")
    if len(names) < 2:
        raise UploadRejected(
            "file", f"the labels hold a single class ({listing(names)}); classification needs at least 2"
        )
    counts = np.bincount(codes, minlength=len(names))
    few = [f"'{names[i]}' ({int(counts[i])})" for i in np.flatnonzero(counts < 2)]
    if few:
        listed = ", ".join(few[:SHOWN]) + (f", ... ({len(few)} in all)" if len(few) > SHOWN else "")
        raise UploadRejected(
            "file", f"every class needs at least 2 rows (one for training, one for validation); too few: {listed}"
        )
    return np.asarray(codes, dtype=np.int64).reshape(-1), names


def check_samples(n: int, per_sample: int, limits: Settings) -> None:
    """MAX_DATASET_SAMPLES and MAX_DATASET_VALUES, from sizes a file declares or a parse found."""
    if n > limits.max_dataset_samples:
        raise over_limit("the dataset's samples", n, limits.max_dataset_samples, "MAX_DATASET_SAMPLES")
    if n * per_sample > limits.max_dataset_values:
        raise over_limit("the dataset's values (samples x features)", n * per_sample, limits.max_dataset_values,
                         "MAX_DATASET_VALUES")  # fmt: skip


# --------------------------------------------------------------------------- stored form


def store_arrays(arrays: UploadedArrays, out: BinaryIO) -> None:
    """The stored form: an uncompressed NPZ (PostgreSQL compresses large values itself),
    written straight to `out` (no copy of the arrays in memory)."""
    np.savez(out, X=arrays.x, y=arrays.y, classes=np.array(arrays.classes, dtype=np.str_))


def decode_arrays(data: bytes) -> UploadedArrays:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return UploadedArrays(npz["X"], npz["y"], [str(c) for c in npz["classes"]])
