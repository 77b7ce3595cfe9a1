"""Issue 14, items 2 and 3: upload decompression bombs and CSV header cost, against a real API.

Each file here is small; what it declares or decompresses to is not. The API must refuse it
from what it declares, or read it in a child whose memory is bounded (UPLOAD_PARSE_MEMORY_BYTES),
and its own peak memory (VmHWM of the uvicorn process, reset before each upload) must stay
a small multiple of the larger of the file and the stored dataset, plus a baseline.

The stack here runs the API (and the reaper) against fresh PostgreSQL and Redis, with the
parse memory lowered to 512 MiB so that a within-the-limits bomb meets it; no worker or
MLflow is needed to upload.
"""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.processes import ProcessGroup
from launcher.stack import start_stack
from tests.integration.conftest import stack_settings

MiB = 2**20
PARSE_MEMORY = 512 * MiB
# The API's growth during one upload may be at most MULTIPLE x max(file, stored) + BASELINE.
MULTIPLE = 3
BASELINE = 64 * MiB
ADMIN = "sec-uploads-" + uuid.uuid4().hex


@dataclass
class UploadStack:
    group: ProcessGroup
    api: httpx.Client  # a plain (non-admin) key of a fresh project: the attacker

    @property
    def api_pid(self) -> int:
        return next(c.process.pid for c in self.group.children if c.name == "api")


@pytest.fixture(scope="module")
def uploads(make_database, tmp_path_factory) -> Iterator[UploadStack]:
    home = tmp_path_factory.mktemp("descent-uploads")
    # With its MLflow server: a large upload's arrays go to the artifact store through it
    # (DATASET_INLINE_MAX_BYTES), and that path is part of what the API's memory bound covers.
    settings = stack_settings(make_database, home, "descent_sec_uploads", bootstrap_key=ADMIN)
    with pytest.MonkeyPatch.context() as env:  # the children read their settings from the environment
        env.setenv("UPLOAD_PARSE_MEMORY_BYTES", str(PARSE_MEMORY))
        group = start_stack(settings, Path(home) / "logs", workers=0)
    base = f"http://127.0.0.1:{settings.api_port}"
    try:
        with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as admin:
            project = f"bomber-{uuid.uuid4().hex[:6]}"
            assert admin.post("/v1/projects", json={"name": project}).status_code == 201
            key = admin.post(f"/v1/projects/{project}/keys", json={"label": "bomber"}).json()["key"]
        with httpx.Client(base_url=base, timeout=300, headers={"Authorization": f"Bearer {key}"}) as api:
            yield UploadStack(group, api)
    finally:
        group.stop_all()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


@dataclass
class Measured:
    response: httpx.Response
    growth_bytes: int  # the API's peak RSS during the upload, over its RSS before
    seconds: float


def upload(stack: UploadStack, content: bytes, filename: str, **form: str) -> Measured:
    pid = stack.api_pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
    before = status_kib(pid, "VmRSS")
    started = time.monotonic()
    response = stack.api.post("/v1/datasets", files={"file": (filename, content)}, data=form)
    seconds = time.monotonic() - started
    growth = (status_kib(pid, "VmHWM") - before) * 1024
    print(f"{filename}: {len(content):,} bytes -> {response.status_code} in {seconds:.1f} s, "
          f"API peak +{growth / MiB:.0f} MiB")  # fmt: skip
    return Measured(response, growth, seconds)


def assert_bounded(measured: Measured, file_bytes: int, stored_bytes: int = 0) -> None:
    bound = MULTIPLE * max(file_bytes, stored_bytes) + BASELINE
    assert measured.growth_bytes <= bound, (
        f"the API grew {measured.growth_bytes / MiB:.0f} MiB for a {file_bytes / MiB:.1f} MiB file "
        f"(stored {stored_bytes / MiB:.1f} MiB); bound {bound / MiB:.0f} MiB"
    )


def assert_refused(measured: Measured, status: int, *words: str) -> None:
    response = measured.response
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    message = body["detail"] if isinstance(body["detail"], str) else body["detail"][0]["msg"]
    for word in words:
        assert word in message, (word, message)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


# --------------------------------------------------------------------------- item 2: the API's memory, declared sizes


def test_a_large_upload_costs_the_api_a_small_multiple_of_what_it_stores(uploads: UploadStack) -> None:
    # First in the module: the unfixed API parsed with pyarrow, whose memory pool keeps what
    # an earlier bomb took, and a later upload would not raise the peak it measures.
    rng = np.random.default_rng(0)
    rows, columns = 400_000, 40  # float64 digits 0-9: compresses ~10x; 64 MB stored as float32
    table = pa.table({f"f{i}": pa.array(rng.integers(0, 10, rows).astype(np.float64)) for i in range(columns)}
                     | {"y": pa.array(np.arange(rows) % 3)})  # fmt: skip
    content = parquet_bytes(table)
    measured = upload(uploads, content, "large.parquet", label="y")
    assert measured.response.status_code == 201, measured.response.text
    stored = rows * columns * 4 + rows * 8
    assert measured.response.json()["n_rows"] == rows
    assert_bounded(measured, len(content), stored)


def test_a_parquet_declaring_twenty_million_rows_is_refused_from_its_metadata(uploads: UploadStack) -> None:
    rows = 20_000_000
    zeros = pa.array(np.zeros(rows))
    table = pa.table({"a": zeros, "b": zeros, "c": zeros, "d": zeros, "y": pa.array(np.arange(rows) % 2)})
    content = parquet_bytes(table)
    assert len(content) < 2 * MiB  # 100 M values in a few hundred KB
    measured = upload(uploads, content, "bomb.parquet", label="y")
    assert_refused(measured, 413, "20,000,000", "MAX_DATASET_SAMPLES")
    assert_bounded(measured, len(content))


def test_an_npz_whose_header_declares_ten_trillion_rows_is_a_413_not_a_500(uploads: UploadStack) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # headers only: no data behind them
        archive.writestr("X.npy", npy_header((10**13, 10)))
        archive.writestr("y.npy", npy_header((10**13,), "<i8"))
    content = buffer.getvalue()
    assert len(content) < 1024
    measured = upload(uploads, content, "header-bomb.npz")
    assert_refused(measured, 413, "10,000,000,000,000", "MAX_DATASET_SAMPLES")
    assert_bounded(measured, len(content))


def test_an_npz_member_declaring_a_huge_uncompressed_size_is_refused(uploads: UploadStack) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, X=np.ones((10, 3)), y=np.arange(10) % 2)
    content = bytearray(buffer.getvalue())
    # Patch X.npy's uncompressed size (local header offset 22, central directory offset 24) to ~4 GB.
    huge = (2**32 - 2).to_bytes(4, "little")
    local = content.index(b"PK\x03\x04")
    central = content.index(b"PK\x01\x02")
    assert content[local + 30 : local + 35] == b"X.npy" and content[central + 46 : central + 51] == b"X.npy"
    content[local + 22 : local + 26] = huge
    content[central + 24 : central + 28] = huge
    measured = upload(uploads, bytes(content), "member-bomb.npz")
    assert_refused(measured, 422, "X.npy declares 4,294,967,294 bytes", "(10, 3)")
    assert_bounded(measured, len(content))


def test_a_zip_bomb_within_the_limits_meets_the_parse_memory_bound_not_the_api(uploads: UploadStack) -> None:
    # 1 M x 100 float64 zeros: 100 M values (within MAX_DATASET_VALUES), 800 MB unpacked, ~1 MB packed.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, X=np.zeros((1_000_000, 100)), y=np.arange(1_000_000) % 2)
    content = buffer.getvalue()
    assert len(content) < 4 * MiB
    measured = upload(uploads, content, "zip-bomb.npz")
    assert_refused(measured, 413, f"{PARSE_MEMORY:,} bytes", "UPLOAD_PARSE_MEMORY_BYTES")
    assert_bounded(measured, len(content))


# --------------------------------------------------------------------------- item 3: CSV header cost


def test_sixty_thousand_csv_columns_named_c_are_refused_before_parsing(uploads: UploadStack) -> None:
    columns = 60_000
    row = ",".join(["1"] * columns)
    content = (",".join(["c"] * columns) + "\n" + f"{row}\n{row}\n").encode()
    measured = upload(uploads, content, "wide.csv", label="c")
    assert_refused(measured, 413, "60,000", "MAX_UPLOAD_COLUMNS")
    assert measured.seconds < 10, measured.seconds  # it took 44.7 s of one core to parse
    assert_bounded(measured, len(content))


def test_duplicate_csv_column_names_are_refused_before_parsing(uploads: UploadStack) -> None:
    columns = 5_000  # under MAX_UPLOAD_COLUMNS
    header = ",".join(["c"] * columns + ["label"])
    rows = "".join(",".join(["1"] * columns + [str(i % 2)]) + "\n" for i in range(4))
    measured = upload(uploads, (header + "\n" + rows).encode(), "duplicates.csv", label="label")
    assert_refused(measured, 422, "unique", "'c' (5,000 times)")
    assert measured.seconds < 10, measured.seconds
