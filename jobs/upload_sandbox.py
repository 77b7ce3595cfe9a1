"""Reading an upload in a child process whose memory, time and number are bounded.

What a file declares is checked before it is read (jobs.upload_readers), but a declaration
cannot tell everything (a Parquet column of one 1 MB string repeated in every row, say),
and parsers are large C libraries: the API never parses an upload itself. The child runs
with RLIMIT_DATA = UPLOAD_PARSE_MEMORY_BYTES (an allocation past it fails: MemoryError,
a 413 naming the setting), is killed after UPLOAD_PARSE_TIMEOUT_S, and at most
UPLOAD_PARSE_CONCURRENCY of them run per API process. The API keeps only what the child
returns: the description and the stored (encoded) form, so its own memory is a small
multiple of the stored dataset, whatever the file.

Children come from a forkserver: a single-threaded process that preloaded numpy, pandas and
pyarrow once, so a child starts in milliseconds and never inherits the API's threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from jobs.settings import Settings
from jobs.uploads import ParsedUpload, ReceivedFile, UploadRejected, store_arrays

log = logging.getLogger(__name__)

PRELOAD = ["jobs.upload_readers", "pandas", "pyarrow.parquet", "pyarrow.compute"]
EXIT_GRACE_S = 10.0  # a child that answered ends by itself: it only closes files

_lock = threading.Lock()
_context: multiprocessing.context.ForkServerContext | None = None
_slots: dict[int, threading.BoundedSemaphore] = {}


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    with _lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _context = context
        return _context


def _slots_for(concurrency: int) -> threading.BoundedSemaphore:
    with _lock:
        return _slots.setdefault(concurrency, threading.BoundedSemaphore(concurrency))


def memory_refusal(limits: Settings) -> UploadRejected:
    return UploadRejected(
        "file", f"reading the file needs more memory than this server gives one upload: "
        f"{limits.upload_parse_memory_bytes:,} bytes (UPLOAD_PARSE_MEMORY_BYTES)", status=413,
    )  # fmt: skip


def parse_in_child(received: ReceivedFile, filename: str | None, label: str | None, limits: Settings) -> ParsedUpload:
    """The upload read, checked and encoded by a bounded child; UploadRejected names what is
    wrong (a limit by its setting), 503 when every parse slot stayed busy."""
    slots = _slots_for(limits.upload_parse_concurrency)
    if not slots.acquire(timeout=limits.upload_parse_timeout_s):
        raise UploadRejected(
            "file", f"the server is reading {limits.upload_parse_concurrency} other uploads "
            "(UPLOAD_PARSE_CONCURRENCY); try again later", status=503,
        )  # fmt: skip
    try:
        return _run_child(received, filename, label, limits)
    finally:
        slots.release()


def _run_child(received: ReceivedFile, filename: str | None, label: str | None, limits: Settings) -> ParsedUpload:
    context = _forkserver()
    stored_path = received.path.with_name(received.path.name + ".stored.npz")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(
        target=child_main, args=(writer, str(received.path), filename, label, limits, str(stored_path)),
        name="descent-upload-parse", daemon=True,
    )  # fmt: skip
    child.start()
    writer.close()  # the child holds the only writer: its end is EOF here
    outcome = None
    try:
        if not reader.poll(limits.upload_parse_timeout_s):
            raise UploadRejected(
                "file", f"reading the file took longer than this server allows: {limits.upload_parse_timeout_s:g} s "
                "(UPLOAD_PARSE_TIMEOUT_S)", status=413,
            )  # fmt: skip
        try:
            outcome = reader.recv()
        except EOFError:  # it died without a word: killed, or aborted in native code
            outcome = None
    finally:
        reader.close()
        child.join(EXIT_GRACE_S if outcome is not None else 0.5)
        if child.is_alive():
            child.kill()
            child.join()
    if outcome is None:
        died = child.exitcode
        how = f"signal {signal.Signals(-died).name}" if died is not None and died < 0 else f"exit status {died}"
        log.warning("an upload's parsing process ended with %s (memory limit %d bytes)", how,
                    limits.upload_parse_memory_bytes)  # fmt: skip
        raise memory_refusal(limits)
    kind, *rest = outcome
    if kind == "rejected":
        field, message, status = rest
        raise UploadRejected(field, message, status)
    if kind == "failed":
        raise RuntimeError(f"reading an upload failed in its child process: {rest[0]}")
    fmt, n_rows, shape, classes, feature_names = rest
    return ParsedUpload(
        format=fmt, sha256=received.sha256, size_bytes=received.size_bytes, n_rows=n_rows, shape=shape,
        classes=classes, feature_names=feature_names, stored=stored_path.read_bytes(),
    )  # fmt: skip


def child_main(
    conn: Connection, path: str, filename: str | None, label: str | None, limits: Settings, stored_path: str
) -> None:
    """The child: bound its memory, read and encode the file, answer with one message."""
    from jobs.upload_readers import read_upload

    resource.setrlimit(resource.RLIMIT_DATA, (limits.upload_parse_memory_bytes, limits.upload_parse_memory_bytes))
    try:
        try:
            fmt, arrays = read_upload(Path(path), filename, label, limits)
            with open(stored_path, "wb") as out:
                store_arrays(arrays, out)
        except MemoryError as exc:  # pyarrow's ArrowMemoryError is one too
            raise memory_refusal(limits) from exc
        conn.send(("parsed", fmt, len(arrays.x), arrays.shape, arrays.classes, arrays.feature_names))
    except UploadRejected as exc:
        conn.send(("rejected", exc.field, exc.message, exc.status))
    except Exception as exc:  # noqa: BLE001 - a bug: the API answers 500 and logs it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
