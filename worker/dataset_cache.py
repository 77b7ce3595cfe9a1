"""The dataset cache: torchvision's files of the standard image sets, in DATASETS_DIR.

The worker calls `ensure_image_set` before a job's trainer starts (the trainer never
downloads, trainer/image_sets.py). A set is ready when its marker says it was verified
against the current checksum table: the md5 of every file is checked once, then the
marker (the table's digest and each file's size) spares the next jobs hashing 170 MB.
A missing set is downloaded through torchvision's own code (its mirrors, md5 checks and
extraction) into a staging folder, verified, and only then moved into place, under a
per-set file lock: two workers never download one set at once, the second waits and
finds it done, and a download that dies half-way leaves nothing that looks complete.

The checksum table, one entry per set (DATASETS_CHECKSUMS replaces it with a JSON file
of the same form):
    {"mnist": {"downloads": {"train-images-idx3-ubyte.gz": "<md5>", ...},
               "files": {"MNIST/raw/train-images-idx3-ubyte.gz": "<md5>", ...}}}
`downloads`: what a mirror serves; `files`: paths under DATASETS_DIR that make up the set.
A `.gz` among the files (the MNIST family) is extracted beside itself when verified, so the
files the trainer reads are the ones the checksums vouch for.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter

from jobs.settings import Settings, settings
from trainer.image_sets import IMAGE_SETS
from trainer.vision import datasets

MARKERS = ".verified"  # <DATASETS_DIR>/.verified/<set>.json: the set was verified against this table
LOCKS = ".locks"
STAGING_PREFIX = ".incoming-"
LOCK_POLL_S = 0.2


class SetChecksums(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    downloads: dict[str, str] = {}  # file name a mirror serves -> md5
    files: dict[str, str]  # path under DATASETS_DIR -> md5

    @property
    def digest(self) -> str:
        """SHA-256 of the set's files and their md5s: what the set is, whoever serves it."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()


ChecksumTable = dict[str, SetChecksums]


class DatasetUnavailable(Exception):
    """The set is not in the cache and could not be fetched. The job fails at once with this
    message (error type `dataset_unavailable`, see worker/execute.py describe_failure)."""

    error_type = "dataset_unavailable"

    def __init__(self, name: str, datasets_dir: Path, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(
            f"{name} is not in DATASETS_DIR={datasets_dir} and could not be downloaded: {reason}. "
            f"Fetch it with python -m api.admin fetch-datasets {name} (or copy torchvision's files there)"
        )


def _torchvision_class(name: str) -> type:
    """torchvision's own class for the set (trainer/image_sets.py may hold a subclass of it)."""
    return next(c for c in IMAGE_SETS[name].reader.__mro__ if c.__module__.startswith("torchvision."))


def _is_mnist_family(name: str) -> bool:
    return issubclass(_torchvision_class(name), datasets.MNIST)


def _download_folder(name: str) -> str:
    """Where torchvision puts what it downloads, relative to the cache."""
    return f"{IMAGE_SETS[name].folder}/raw" if _is_mnist_family(name) else "."


def torchvision_checksums() -> ChecksumTable:
    """The product's table, read from torchvision's class attributes (one place: torchvision)."""
    table = {}
    for name, image_set in IMAGE_SETS.items():
        source = _torchvision_class(name)
        if _is_mnist_family(name):
            downloads = dict(source.resources)
            files = {f"{image_set.folder}/raw/{file}": md5 for file, md5 in downloads.items()}
        else:
            downloads = {source.filename: source.tgz_md5}
            listed = [*source.train_list, *source.test_list, [source.meta["filename"], source.meta["md5"]]]
            files = {f"{source.base_folder}/{file}": md5 for file, md5 in listed}
        table[name] = SetChecksums(downloads=downloads, files=files)
    return table


def read_checksum_table(path: Path | None) -> ChecksumTable:
    if path is None:
        return torchvision_checksums()
    return TypeAdapter(ChecksumTable).validate_json(Path(path).read_bytes())


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Timeout(urllib.request.BaseHandler):
    """Gives urllib requests without a timeout of their own (torchvision's) this one, so an
    offline machine or a silent mirror fails in seconds instead of hanging the job."""

    timeout_s = 15.0

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        if request.timeout is socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
            request.timeout = self.timeout_s
        return request

    https_request = http_request


_TIMEOUT = _Timeout()
_TIMEOUT_INSTALLED = False


def _bound_urllib(timeout_s: float) -> None:
    global _TIMEOUT_INSTALLED
    _TIMEOUT.timeout_s = timeout_s
    if not _TIMEOUT_INSTALLED:
        urllib.request.install_opener(urllib.request.build_opener(_TIMEOUT))
        _TIMEOUT_INSTALLED = True


@dataclass(frozen=True)
class DatasetCache:
    root: Path
    table: ChecksumTable
    download: bool = True
    mirror: str = ""  # empty: torchvision's mirrors
    timeout_s: float = 15.0
    lock_wait_s: float = 3600.0

    @classmethod
    def from_settings(cls, config: Settings = settings) -> DatasetCache:
        return cls(
            root=Path(config.datasets_dir).resolve(),
            table=read_checksum_table(config.datasets_checksums),
            download=config.datasets_download,
            mirror=config.datasets_mirror,
            timeout_s=config.datasets_timeout_s,
            lock_wait_s=config.datasets_lock_wait_s,
        )

    # ------------------------------------------------------------------ what the cache holds

    def checksums(self, name: str) -> SetChecksums:
        if name not in self.table:
            raise DatasetUnavailable(name, self.root, "the checksum table has no entry for it")
        return self.table[name]

    def _marker(self, name: str) -> Path:
        return self.root / MARKERS / f"{name}.json"

    def is_ready(self, name: str) -> bool:
        """Verified against this table, and every file still there at the size it had (no hashing)."""
        try:
            marker = json.loads(self._marker(name).read_text())
            if marker["table"] != self.checksums(name).digest:
                return False
            return all((self.root / path).stat().st_size == size for path, size in marker["sizes"].items())
        except (OSError, ValueError, KeyError, DatasetUnavailable):
            return False

    def _verify(self, folder: Path, name: str) -> str | None:
        """Why the set's files under `folder` are not the set (missing, wrong md5), or None.
        A verified .gz is extracted beside itself, over whatever stood there."""
        entry = self.checksums(name)
        missing = [path for path in entry.files if not (folder / path).is_file()]
        if missing:
            return f"{len(missing)} of its {len(entry.files)} files are missing ({', '.join(sorted(missing)[:3])})"
        for path, md5 in entry.files.items():
            if _md5(folder / path) != md5:
                return f"{path} does not match its checksum (md5 {md5})"
        for path in entry.files:
            if path.endswith(".gz"):
                datasets.utils.extract_archive(str(folder / path))
        return None

    def _set_paths(self, name: str) -> list[str]:
        """The set's files and what their .gz files extract to."""
        files = list(self.checksums(name).files)
        return files + [path.removesuffix(".gz") for path in files if path.endswith(".gz")]

    def _mark_verified(self, name: str) -> None:
        marker = self._marker(name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        sizes = {path: (self.root / path).stat().st_size for path in self._set_paths(name)}
        staged = marker.with_suffix(".tmp")
        staged.write_text(json.dumps({"table": self.checksums(name).digest, "sizes": sizes}))
        os.replace(staged, marker)  # the marker appears whole or not at all

    # ------------------------------------------------------------------ filling it

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """One process at a time per set, across the workers sharing the cache; the kernel
        releases it when a holder dies."""
        path = self.root / LOCKS / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            deadline = time.monotonic() + self.lock_wait_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DatasetUnavailable(
                            name, self.root, f"another process has been fetching it for over {self.lock_wait_s:g} s"
                        ) from None
                    time.sleep(LOCK_POLL_S)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _urls(self, name: str, file: str) -> list[str]:
        if self.mirror:
            return [f"{self.mirror.rstrip('/')}/{name}/{file}"]
        source = _torchvision_class(name)
        if _is_mnist_family(name):
            return [f"{mirror}{file}" for mirror in source.mirrors]
        return [f"{source.url.rsplit('/', 1)[0]}/{file}"]

    def _download_into(self, staging: Path, name: str) -> None:
        """torchvision's download_and_extract_archive per file, each mirror in turn: it checks
        the md5 of what came and extracts it. A download the set's files do not list is deleted."""
        entry = self.checksums(name)
        if not entry.downloads:
            raise DatasetUnavailable(name, self.root, "the checksum table lists nothing to download for it")
        _bound_urllib(self.timeout_s)
        folder = _download_folder(name)
        for file, md5 in entry.downloads.items():
            keep = os.path.normpath(f"{folder}/{file}") in entry.files
            errors = []
            for url in self._urls(name, file):
                try:
                    datasets.utils.download_and_extract_archive(
                        url, download_root=str(staging / folder), filename=file, md5=md5, remove_finished=not keep
                    )
                    break
                except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
                    errors.append(f"{url}: {exc}")
            else:
                raise DatasetUnavailable(name, self.root, "; ".join(errors))

    def _fill(self, name: str, stage: Callable[[Path], None], refused: str) -> None:
        """Stage the set beside the cache (`stage(folder)` puts its files there), verify it, move
        its folders into place, then mark it: no step leaves a set that looks complete but is not."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=self.root))
        try:
            stage(staging)
            problem = self._verify(staging, name)
            if problem:
                raise DatasetUnavailable(name, self.root, f"{refused}: {problem}")
            self._marker(name).unlink(missing_ok=True)
            for folder in sorted({path.split("/", 1)[0] for path in self.checksums(name).files}):
                target = self.root / folder
                if target.exists():
                    target.rename(staging / f"{STAGING_PREFIX}old-{folder}")  # deleted with the staging folder
                os.replace(staging / folder, target)
            self._mark_verified(name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def ensure(self, name: str) -> Path:
        """The cache folder, with the set verified in it; downloads it if missing and allowed.
        Raises DatasetUnavailable, in seconds when offline."""
        self.fetch(name)
        return self.root

    def fetch(self, name: str) -> str:
        """Make the set ready; says how: "ready" (verified earlier), "verified" (its files were
        there), "downloaded"."""
        if self.is_ready(name):
            return "ready"
        self.checksums(name)  # an unknown set fails before any lock or folder is made
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(name):
            if self.is_ready(name):  # another worker fetched it while this one waited
                return "ready"
            problem = self._verify(self.root, name)
            if problem is None:  # copied in by hand, or a crash between moving and marking
                self._mark_verified(name)
                return "verified"
            if not self.download:
                raise DatasetUnavailable(name, self.root, f"downloads are off (DATASETS_DOWNLOAD=false); {problem}")
            self._fill(name, lambda staging: self._download_into(staging, name), "what was downloaded is not the set")
        return "downloaded"

    def copy_from(self, name: str, source: Path) -> Path:
        """Fill the cache from a folder laid out as torchvision's root (e.g. MNIST/raw/..., cifar-10-batches-py/)."""
        self.checksums(name)

        def stage(staging: Path) -> None:
            for path in self._set_paths(name):
                if (source / path).is_file():
                    (staging / path).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source / path, staging / path)

        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock(name):
            self._fill(name, stage, f"{source} does not hold it")
        return self.root


def ensure_image_set(name: str, cache: DatasetCache | None = None) -> Path:
    """The dataset cache folder holding the set `name`, verified (see DatasetCache.ensure)."""
    return (cache or DatasetCache.from_settings()).ensure(name)


def image_set_digest(name: str, cache: DatasetCache | None = None) -> str:
    """The set's digest in the checksum table: the same for every run on the same files."""
    return (cache or DatasetCache.from_settings()).checksums(name).digest
