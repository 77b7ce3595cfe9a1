"""Reading an uploaded dataset file once: CSV or Parquet with a label column, or an NPZ
with arrays X and y. Everything is checked before anything is stored, and every refusal
names the problem; what passes is normalised to float32 X, int64 labels 0..C-1 and the
class names, the only form workers ever read (encode_arrays / decode_arrays).

Torch- and SQL-free: the API imports it. pandas is imported where a table is read.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from jobs.settings import Settings

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet", "npz": "NPZ"}
ACCEPTED = "CSV (.csv) or Parquet (.parquet) with a label column, or NumPy NPZ (.npz) with arrays X and y"
SHOWN = 20  # names listed in a message before "..."


class UploadRejected(ValueError):
    """A file that cannot become a dataset: `field` is the form field at fault, `status` the HTTP answer."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status


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
class ParsedUpload:
    arrays: UploadedArrays
    format: str
    sha256: str
    size_bytes: int


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(str(n)[:60]) for n in names[:SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


def file_format(filename: str | None, data: bytes) -> str:
    """The format by extension; a file without one by its first bytes."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    if suffix:
        raise UploadRejected("file", f"unsupported file type '{suffix}'; accepted: {ACCEPTED}", status=415)
    if data.startswith(b"PAR1"):
        return "parquet"
    if data.startswith(b"PK"):
        return "npz"
    return "csv"


def parse_upload(data: bytes, filename: str | None, label: str | None, limits: Settings) -> ParsedUpload:
    """Check and normalise an uploaded file; UploadRejected names what is wrong."""
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(
            "file",
            f"the file ({len(data):,} bytes) is over this server's limit of {limits.max_upload_bytes:,} bytes "
            "(MAX_UPLOAD_BYTES)",
            status=413,
        )
    if not data.strip():
        raise UploadRejected("file", "the file is empty")
    fmt = file_format(filename, data)
    arrays = _read_npz(data) if fmt == "npz" else _read_table(data, fmt, label)
    _check_samples(arrays, limits)
    return ParsedUpload(arrays, fmt, hashlib.sha256(data).hexdigest(), len(data))


# --------------------------------------------------------------------------- tables


def _read_table(data: bytes, fmt: str, label: str | None) -> UploadedArrays:
    import pandas as pd

    try:  # the parsers raise many kinds of errors for a broken file: each one is "unreadable"
        frame = pd.read_csv(io.BytesIO(data)) if fmt == "csv" else pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UploadRejected("file", f"the file cannot be read as {FORMAT_NAMES[fmt]}: {reason}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if not label:
        raise UploadRejected("label", f"name the label column (form field 'label'); columns found: {_listing(columns)}")
    if label not in columns:
        raise UploadRejected("label", f"no column '{label}' in the file; columns found: {_listing(columns)}")
    if len(frame) == 0:
        raise UploadRejected("file", "the file has a header but no rows")
    features = frame.drop(columns=[label])
    if features.shape[1] == 0:
        raise UploadRejected("file", f"the file has no feature columns besides the label '{label}'")
    not_numeric = [c for c in features.columns if not (pd.api.types.is_numeric_dtype(features[c]))]
    if not_numeric:
        raise UploadRejected(
            "file", f"feature columns must be numeric; not numeric: {_listing(not_numeric)} (label column: '{label}')"
        )
    labels = frame[label]
    if labels.isna().any():
        raise UploadRejected("file", f"the label column '{label}' has {int(labels.isna().sum())} empty values")
    x = _float32(features.to_numpy())
    _check_finite(x, list(features.columns))
    y, classes = _classes(labels.to_numpy())
    return UploadedArrays(x, y, classes, list(features.columns))


# --------------------------------------------------------------------------- NPZ


def _read_npz(data: bytes) -> UploadedArrays:
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UploadRejected("file", "the file is a single NumPy array; an NPZ holds two: np.savez(path, X=X, y=y)")
        with loaded as npz:
            found = list(npz.files)
            missing = [name for name in ("X", "y") if name not in found]
            if missing:
                raise UploadRejected(
                    "file", f"an NPZ needs arrays X and y; missing {_listing(missing)}, found {_listing(found)}"
                )
            x, y = npz["X"], npz["y"]
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):  # members that are not .npy files
            raise UploadRejected("file", "the file cannot be read as NPZ: X and y must be NumPy arrays (np.savez)")
    except UploadRejected:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # pickles, a broken archive
        raise UploadRejected("file", f"the file cannot be read as NPZ: {exc}") from exc
    if x.ndim not in (2, 3, 4):
        raise UploadRejected(
            "file", f"X must be 2-D (samples x features), 3-D (samples x T x F) or 4-D (samples x C x H x W); "
            f"it is {x.ndim}-D {tuple(x.shape)}",
        )  # fmt: skip
    if y.ndim != 1:
        raise UploadRejected("file", f"y must be 1-D (one label per sample); it is {y.ndim}-D {tuple(y.shape)}")
    if len(x) != len(y):
        raise UploadRejected("file", f"X has {len(x)} samples but y has {len(y)} labels")
    if len(x) == 0 or 0 in x.shape:
        raise UploadRejected("file", f"X is empty {tuple(x.shape)}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise UploadRejected("file", f"X must hold real numbers; its dtype is {x.dtype}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise UploadRejected("file", f"y has {int((~np.isfinite(y)).sum())} NaN or infinite labels")
    if y.dtype.kind not in "biufUS":
        raise UploadRejected("file", f"y must hold integer or string labels; its dtype is {y.dtype}")
    x = _float32(x)
    flat = x.reshape(len(x), -1)
    _check_finite(flat, [f"X[:, {i}]" for i in range(flat.shape[1])] if x.ndim == 2 else None, x.shape[1:])
    y_codes, classes = _classes(y)
    return UploadedArrays(x, y_codes, classes)


# --------------------------------------------------------------------------- shared checks


def _float32(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf, refused below
        return np.ascontiguousarray(x, dtype=np.float32)


def _check_finite(x: np.ndarray, names: list[str] | None, sample_shape: tuple[int, ...] = ()) -> None:
    """x is (n, values) float32; NaN and inf (also values beyond float32's range) are refused, by column."""
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    if not count:
        return
    per_column = bad.sum(axis=0)
    worst = [int(i) for i in np.flatnonzero(per_column)]
    if names is not None:
        where = ", ".join(f"'{names[i]}': {int(per_column[i])}" for i in worst[:SHOWN])
    else:  # sequences and images: the position within a sample
        where = ", ".join(f"X[:, {', '.join(map(str, np.unravel_index(i, sample_shape)))}]: {int(per_column[i])}"
                          for i in worst[:SHOWN])  # fmt: skip
    more = f", ... ({len(worst)} columns in all)" if len(worst) > SHOWN else ""
    raise UploadRejected("file", f"the features hold {count} NaN or infinite values (by column: {where}{more})")


def _classes(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Labels (ints or strings) -> codes 0..C-1 and the class names in code order."""
    if labels.dtype == object:  # mixed types from a table: compare them as text
        labels = labels.astype(str)
    elif labels.dtype.kind == "S":  # bytes from an NPZ: names are text
        labels = np.char.decode(labels, "utf-8", "replace")
    values, codes = np.unique(labels, return_inverse=True)
    names = [str(v.item() if hasattr(v, "item") else v) for v in values]
    if len(set(names)) != len(names):  # 1 and 1.0 in one column, say
        raise UploadRejected("file", f"the labels' names are ambiguous: {_listing(names)}")
    if len(values) < 2:
        raise UploadRejected(
            "file", f"the labels hold a single class ({_listing(names)}); classification needs at least 2"
        )
    counts = np.bincount(codes, minlength=len(values))
    few = [f"'{names[i]}' ({int(counts[i])})" for i in np.flatnonzero(counts < 2)]
    if few:
        listed = ", ".join(few[:SHOWN]) + (f", ... ({len(few)} in all)" if len(few) > SHOWN else "")
        raise UploadRejected(
            "file", f"every class needs at least 2 rows (one for training, one for validation); too few: {listed}"
        )
    return codes.astype(np.int64).reshape(-1), names


def _check_samples(arrays: UploadedArrays, limits: Settings) -> None:
    n, per_sample = len(arrays.x), int(np.prod(arrays.shape))
    if n > limits.max_dataset_samples:
        raise UploadRejected(
            "file", f"the dataset's samples ({n:,}) are over this server's limit of {limits.max_dataset_samples:,} "
            "(MAX_DATASET_SAMPLES)", status=413,
        )  # fmt: skip
    if n * per_sample > limits.max_dataset_values:
        raise UploadRejected(
            "file", f"the dataset's values (samples x features = {n * per_sample:,}) are over this server's limit "
            f"of {limits.max_dataset_values:,} (MAX_DATASET_VALUES)", status=413,
        )  # fmt: skip


# --------------------------------------------------------------------------- stored form


def encode_arrays(arrays: UploadedArrays) -> bytes:
    """The stored form: an uncompressed NPZ (PostgreSQL compresses large values itself)."""
    buffer = io.BytesIO()
    np.savez(buffer, X=arrays.x, y=arrays.y, classes=np.array(arrays.classes, dtype=np.str_))
    return buffer.getvalue()


def decode_arrays(data: bytes) -> UploadedArrays:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return UploadedArrays(npz["X"], npz["y"], [str(c) for c in npz["classes"]])
