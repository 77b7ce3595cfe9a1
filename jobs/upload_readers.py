"""Reading an uploaded file of each format into UploadedArrays. Each reader first checks what
the file declares — a CSV's header, a Parquet file's metadata, the zip members' sizes and
.npy headers of an NPZ — against the server's limits, and only then materialises data, a
bounded amount at a time: a small file that declares (or decompresses to) a huge dataset is
refused before it costs memory. jobs.upload_sandbox runs read_upload in a child process
whose memory is bounded too, for whatever a declaration cannot tell.

Torch- and SQL-free; pandas and pyarrow are imported where a table is read.
"""

from __future__ import annotations

import csv
import io
import math
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from jobs.settings import Settings
from jobs.uploads import (
    COPY_CHUNK,
    FORMAT_NAMES,
    SHOWN,
    UploadedArrays,
    UploadRejected,
    check_finite,
    check_samples,
    encode_labels,
    file_format,
    listing,
    over_limit,
    to_float32,
)

# The `label` form field's own limit: a longer column could not be named as the label, and
# feature names are stored with the dataset and shown in every listing.
MAX_COLUMN_NAME_CHARS = 200
# Feature values converted per Parquet read: bounds the parse's working memory beyond the result.
PARQUET_VALUES_PER_READ = 8_000_000


def read_upload(path: Path, filename: str | None, label: str | None, limits: Settings) -> tuple[str, UploadedArrays]:
    """(format, arrays) of an uploaded file; UploadRejected names what is wrong."""
    with open(path, "rb") as file:
        head = file.read(8)
    _refuse_blank(path)
    fmt = file_format(filename, head)
    if fmt == "npz":
        return fmt, read_npz(path, limits)
    if fmt == "parquet":
        return fmt, read_parquet(path, label, limits)
    return fmt, read_csv(path, label, limits)


def _refuse_blank(path: Path) -> None:
    with open(path, "rb") as file:
        while chunk := file.read(COPY_CHUNK):
            if chunk.strip():
                return
    raise UploadRejected("file", "the file is empty")


def _unreadable(fmt: str, exc: BaseException) -> UploadRejected:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UploadRejected("file", f"the file cannot be read as {FORMAT_NAMES[fmt]}: {reason}")


# --------------------------------------------------------------------------- tables


def check_columns(columns: list[str], label: str | None, limits: Settings) -> list[str]:
    """A table's header, before any row is read: the column count, unique and short names, the
    label among them. Returns the feature columns. (pandas renames duplicates one by one,
    quadratically: 60k columns named `c` took 45 s of a core.)"""
    if len(columns) > limits.max_upload_columns:
        raise over_limit("the file's columns", len(columns), limits.max_upload_columns, "MAX_UPLOAD_COLUMNS")
    repeated = [(name, count) for name, count in Counter(columns).items() if count > 1]
    if repeated:
        shown = ", ".join(f"{name[:60]!r} ({count:,} times)" for name, count in repeated[:SHOWN])
        more = f", ... ({len(repeated)} names in all)" if len(repeated) > SHOWN else ""
        raise UploadRejected("file", f"column names must be unique; repeated: {shown}{more}")
    long = [name for name in columns if len(name) > MAX_COLUMN_NAME_CHARS]
    if long:
        raise UploadRejected(
            "file", f"column names must be at most {MAX_COLUMN_NAME_CHARS} characters; longer: {listing(long)}"
        )
    if not label:
        raise UploadRejected("label", f"name the label column (form field 'label'); columns found: {listing(columns)}")
    if label not in columns:
        raise UploadRejected("label", f"no column '{label}' in the file; columns found: {listing(columns)}")
    features = [name for name in columns if name != label]
    if not features:
        raise UploadRejected("file", f"the file has no feature columns besides the label '{label}'")
    return features


def _not_numeric(not_numeric: list[str], label: str) -> UploadRejected:
    return UploadRejected(
        "file", f"feature columns must be numeric; not numeric: {listing(not_numeric)} (label column: '{label}')"
    )


def _feature_matrix(n: int, width: int) -> np.ndarray:
    return np.empty((n, width), dtype=np.float32)


def csv_header(path: Path, limits: Settings) -> list[str]:
    """The first record of a CSV, read from a bounded prefix of the file: a header longer than
    MAX_UPLOAD_COLUMNS names of MAX_COLUMN_NAME_CHARS could hold is refused unread."""
    budget = limits.max_upload_columns * (4 * MAX_COLUMN_NAME_CHARS + 3) + 1024
    with open(path, "rb") as file:
        head = file.read(budget + 1)
    text = head.decode("utf-8-sig", errors="replace")  # a character cut at the end is past the header
    stream = io.StringIO(text, newline="")
    header: list[str] = []
    try:
        for row in csv.reader(stream):
            if row:  # pandas skips blank lines before the header too
                header = row
                break
    except csv.Error as exc:
        raise _unreadable("csv", exc) from exc
    if len(head) > budget and stream.tell() >= len(text) and not text.endswith(("\n", "\r")):
        raise UploadRejected(
            "file", f"the header (first line) is longer than {budget:,} bytes: more than this server's "
            f"{limits.max_upload_columns:,} columns (MAX_UPLOAD_COLUMNS) of names up to {MAX_COLUMN_NAME_CHARS} "
            "characters", status=413,
        )  # fmt: skip
    return header


def read_csv(path: Path, label: str | None, limits: Settings) -> UploadedArrays:
    import pandas as pd

    check_columns(csv_header(path, limits), label, limits)
    assert label is not None  # check_columns refuses a missing one
    try:  # the parsers raise many kinds of errors for a broken file: each one is "unreadable"
        # One row past the limit is enough to know the file is over it.
        frame = pd.read_csv(path, nrows=limits.max_dataset_samples + 1)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _unreadable("csv", exc) from exc
    frame.columns = [str(c) for c in frame.columns]
    if len(frame) == 0:
        raise UploadRejected("file", "the file has a header but no rows")
    if len(frame) > limits.max_dataset_samples:
        raise UploadRejected(
            "file", f"the dataset has more than {limits.max_dataset_samples:,} samples, this server's limit "
            "(MAX_DATASET_SAMPLES)", status=413,
        )  # fmt: skip
    features = [c for c in frame.columns if c != label]  # as pandas read them (an index column, say)
    if label not in frame.columns or not features:
        raise UploadRejected("file", f"the file has no feature columns besides the label '{label}'")
    not_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise _not_numeric(not_numeric, label)
    labels = frame[label]
    if labels.isna().any():
        raise UploadRejected("file", f"the label column '{label}' has {int(labels.isna().sum())} empty values")
    check_samples(len(frame), len(features), limits)
    x = _feature_matrix(len(frame), len(features))
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32's range: inf, refused below
        for j, name in enumerate(features):
            x[:, j] = frame[name].to_numpy(dtype=np.float64)
    check_finite(x, features)
    values = labels.to_numpy()
    del frame, labels
    y, names = encode_labels(values, limits)
    return UploadedArrays(x, y, names, features)


def _parquet_label_kind(arrow_type: object) -> str | None:
    """'text' or 'number' for a label column type this server reads, else None."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type):
        return "number"
    return None


def read_parquet(path: Path, label: str | None, limits: Settings) -> UploadedArrays:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:  # the footer only: the schema and the row count, no data
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _unreadable("parquet", exc) from exc
    features = check_columns(list(schema.names), label, limits)
    assert label is not None
    n = parquet.metadata.num_rows
    if n == 0:
        raise UploadRejected("file", "the file has a header but no rows")
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal)
    not_numeric = [name for name in features if not any(test(schema.field(name).type) for test in numeric)]
    if not_numeric:
        raise _not_numeric(not_numeric, label)
    label_kind = _parquet_label_kind(schema.field(label).type)
    if label_kind is None:
        raise UploadRejected(
            "file", f"the label column '{label}' must hold numbers or text; it holds {schema.field(label).type}"
        )
    check_samples(n, len(features), limits)  # as declared: before a single value is read

    x = _feature_matrix(n, len(features))
    per_read = max(1, PARQUET_VALUES_PER_READ // n)
    try:
        for start in range(0, len(features), per_read):
            table = parquet.read(columns=features[start : start + per_read], use_threads=False)
            if table.num_rows != n:
                raise UploadRejected("file", f"the file declares {n} rows but holds {table.num_rows}")
            with np.errstate(over="ignore", invalid="ignore"):
                for j, column in enumerate(table.columns):  # nulls become NaN, refused below
                    x[:, start + j] = pc.cast(column, pa.float64(), safe=False).to_numpy()
            del table
        # Text labels stay dictionary-encoded: each distinct name is materialised once.
        label_file = pq.ParquetFile(path, read_dictionary=[label] if label_kind == "text" else None)
        labels = label_file.read(columns=[label], use_threads=False).column(0)
    except (MemoryError, UploadRejected):
        raise
    except Exception as exc:  # noqa: BLE001
        raise _unreadable("parquet", exc) from exc
    check_finite(x, features)
    empty = labels.null_count
    if label_kind == "number" and pa.types.is_floating(labels.type):
        empty += int(pc.sum(pc.is_nan(labels)).as_py() or 0)
    if empty:
        raise UploadRejected("file", f"the label column '{label}' has {empty} empty values")
    values = labels.to_pandas() if label_kind == "text" else labels.to_numpy()
    y, names = encode_labels(values, limits)
    return UploadedArrays(x, y, names, features)


# --------------------------------------------------------------------------- NPZ


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of a .npy member, from its first bytes only."""
    name = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
        except ValueError as exc:  # a member that is no .npy file
            raise UploadRejected(
                "file", "the file cannot be read as NPZ: X and y must be NumPy arrays (np.savez)"
            ) from exc
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:  # 3.0 only holds structured dtypes with non-Latin-1 field names
            raise UploadRejected("file", f"the file cannot be read as NPZ: {name} is a .npy of version {version}")
        return tuple(int(d) for d in shape), dtype, member.tell()


def _check_npz_declared(
    archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], limits: Settings
) -> None:
    """X and y as their headers and the zip directory declare them, before either is read."""
    (x_shape, x_dtype, x_header), (y_shape, y_dtype, y_header) = (_npy_header(archive, members[k]) for k in "Xy")
    for name, dtype in (("X", x_dtype), ("y", y_dtype)):
        if dtype.hasobject:
            raise UploadRejected(
                "file", f"the file cannot be read as NPZ: {name} holds Python objects, which would need "
                "allow_pickle (this server never unpickles an upload)",
            )  # fmt: skip
    if len(x_shape) not in (2, 3, 4):
        raise UploadRejected(
            "file", f"X must be 2-D (samples x features), 3-D (samples x T x F) or 4-D (samples x C x H x W); "
            f"it is {len(x_shape)}-D {x_shape}",
        )  # fmt: skip
    if len(y_shape) != 1:
        raise UploadRejected("file", f"y must be 1-D (one label per sample); it is {len(y_shape)}-D {y_shape}")
    if x_shape[0] != y_shape[0]:
        raise UploadRejected("file", f"X has {x_shape[0]} samples but y has {y_shape[0]} labels")
    if 0 in x_shape:
        raise UploadRejected("file", f"X is empty {x_shape}")
    if not (np.issubdtype(x_dtype, np.number) or x_dtype == np.bool_) or x_dtype.kind == "c":
        raise UploadRejected("file", f"X must hold real numbers; its dtype is {x_dtype}")
    if y_dtype.kind not in "biufUS":
        raise UploadRejected("file", f"y must hold integer or string labels; its dtype is {y_dtype}")
    check_samples(x_shape[0], math.prod(x_shape[1:]), limits)
    width = y_dtype.itemsize // 4 if y_dtype.kind == "U" else y_dtype.itemsize
    if y_dtype.kind in "US" and width > limits.max_class_name_chars:
        raise UploadRejected(
            "file", f"y's labels are up to {width:,} characters wide (dtype {y_dtype}), over this server's limit "
            f"of {limits.max_class_name_chars:,} (MAX_CLASS_NAME_CHARS)", status=413,
        )  # fmt: skip
    # A member's declared (uncompressed) size is what reading it will produce: it must be its header's.
    for name, shape, dtype, header in (("X", x_shape, x_dtype, x_header), ("y", y_shape, y_dtype, y_header)):
        expected = header + math.prod(shape) * dtype.itemsize
        if members[name].file_size != expected:
            raise UploadRejected(
                "file", f"the file cannot be read as NPZ: {members[name].filename} declares "
                f"{members[name].file_size:,} bytes, but its header describes {shape} {dtype}: {expected:,} bytes",
            )  # fmt: skip


def _member_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def read_npz(path: Path, limits: Settings) -> UploadedArrays:
    with open(path, "rb") as file:
        if file.read(6) == b"\x93NUMPY":
            raise UploadRejected("file", "the file is a single NumPy array; an NPZ holds two: np.savez(path, X=X, y=y)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            missing = [name for name in ("X", "y") if name not in members]
            if missing:
                raise UploadRejected(
                    "file", f"an NPZ needs arrays X and y; missing {listing(missing)}, found {listing(list(members))}"
                )
            _check_npz_declared(archive, members, limits)
            x, y = _member_array(archive, members["X"]), _member_array(archive, members["y"])
    except (UploadRejected, MemoryError):
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise UploadRejected("file", f"the file cannot be read as NPZ: {exc}") from exc
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise UploadRejected("file", f"y has {int((~np.isfinite(y)).sum())} NaN or infinite labels")
    x = to_float32(x)
    flat = x.reshape(len(x), -1)
    check_finite(flat, [f"X[:, {i}]" for i in range(flat.shape[1])] if x.ndim == 2 else None, x.shape[1:])
    y_codes, names = encode_labels(y, limits)
    return UploadedArrays(x, y_codes, names)
