"""Large state (checkpoints, uploaded datasets) in MLflow's artifact store, through the MLflow
server's artifact proxy (`--serve-artifacts`): whatever the server's `--artifacts-destination`
is (a local directory, S3 or MinIO, GCS, Azure), Descent needs only the tracking URI and
adds no storage system of its own. PostgreSQL keeps the pointer (an `mlflow-artifacts:/...`
URI, which names no host: the server's address may change), the size and the SHA-256; every
read is checked against them.

Descent's objects live under `descent/`, a path that names no experiment: with MLflow's
basic-auth app only its admin login reaches them (deploy/mlflow-auth.ini denies the rest).

Torch- and SQL-free: the API stores uploads through it, the worker checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import time
from dataclasses import dataclass

import requests
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

import jobs.tracking  # noqa: F401 - MLflow's client retries as Descent sets them, before any request
from jobs.settings import settings

log = logging.getLogger(__name__)

SCHEME = "mlflow-artifacts:/"
PREFIX = "descent"
PROXY_ENDPOINT = "/api/2.0/mlflow-artifacts/artifacts"
READ_CHUNK = 1 << 20
RETRY_PAUSE_S = 2.0


class ArtifactStoreUnreachable(RuntimeError):
    """The MLflow server (or the store behind it) did not answer, or answered with an error."""


class ArtifactMissing(LookupError):
    """The store answered, and has no object at this URI."""


class ArtifactCorrupt(ValueError):
    """What the store gave back is not what was stored: its size or SHA-256 differs."""


@dataclass(frozen=True)
class StoredObject:
    """Where an object is and what it must read back as."""

    uri: str
    size_bytes: int
    sha256: str


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_uri(*parts: str) -> str:
    """`mlflow-artifacts:/descent/<parts...>`."""
    return SCHEME + posixpath.join(PREFIX, *parts)


def _endpoint(uri: str) -> str:
    if not uri.startswith(SCHEME + PREFIX + "/"):
        raise ValueError(f"{uri!r} is not an object of Descent's ({SCHEME}{PREFIX}/...)")
    return f"{PROXY_ENDPOINT}/{uri[len(SCHEME):]}"


def _request(method: str, uri: str, endpoint: str | None = None, **kwargs: object) -> requests.Response:
    """One request to the artifact proxy with MLflow's own client (its credentials, TLS
    settings and retries of a failed connection)."""
    creds = get_default_host_creds(settings.mlflow_tracking_uri)
    try:
        response = http_request(creds, endpoint or _endpoint(uri), method, **kwargs)
    except (requests.exceptions.RequestException, MlflowException) as exc:
        raise ArtifactStoreUnreachable(f"the artifact store (MLflow at {settings.mlflow_tracking_uri}) did not "
                                       f"answer {method} {uri}: {exc}") from exc  # fmt: skip
    if response.status_code == 404:
        raise ArtifactMissing(f"the artifact store has no object {uri}")
    if response.status_code >= 400:
        raise ArtifactStoreUnreachable(
            f"the artifact store (MLflow at {settings.mlflow_tracking_uri}) refused {method} {uri}: "
            f"HTTP {response.status_code} {response.text[:300]}"
        )
    return response


def put_object(uri: str, data: bytes) -> StoredObject:
    """Store `data` at `uri` (replacing what was there); its pointer, size and checksum."""
    _request("PUT", uri, data=data, extra_headers={"Content-Type": "application/octet-stream"})
    return StoredObject(uri, len(data), sha256_of(data))


def get_object(stored: StoredObject) -> bytes:
    """The object's bytes, checked against its size and SHA-256 as they arrive. ArtifactCorrupt
    when they differ, ArtifactMissing when it is gone, ArtifactStoreUnreachable otherwise."""
    response = _request("GET", stored.uri, stream=True)
    digest, buffer = hashlib.sha256(), io.BytesIO()
    try:
        for chunk in response.iter_content(chunk_size=READ_CHUNK):
            digest.update(chunk)
            buffer.write(chunk)
            if buffer.tell() > stored.size_bytes:
                break  # already not the object stored: read no further
    except requests.exceptions.RequestException as exc:
        raise ArtifactStoreUnreachable(f"reading {stored.uri} from the artifact store broke off: {exc}") from exc
    finally:
        response.close()
    size = buffer.tell()
    if size != stored.size_bytes:
        raise ArtifactCorrupt(f"{stored.uri} read back as {size:,}{'+' if size > stored.size_bytes else ''} bytes; "
                              f"{stored.size_bytes:,} were stored")  # fmt: skip
    if (got := digest.hexdigest()) != stored.sha256:
        raise ArtifactCorrupt(f"{stored.uri} read back with SHA-256 {got}; {stored.sha256} was stored")
    return buffer.getvalue()


def get_object_waiting(stored: StoredObject, wait_s: float) -> bytes:
    """get_object, waiting up to `wait_s` for a store that does not answer (MLflow restarting):
    a missing or corrupt object is a final answer at once."""
    until = time.monotonic() + wait_s
    while True:
        try:
            return get_object(stored)
        except ArtifactStoreUnreachable as exc:
            if time.monotonic() >= until:
                raise
            log.warning("%s; trying again", exc)
            time.sleep(RETRY_PAUSE_S)


@dataclass(frozen=True)
class Entry:
    """One name in a folder of the store."""

    uri: str
    is_folder: bool


def list_folder(*parts: str) -> list[Entry]:
    """What `descent/<parts...>` holds, one level deep ([] for a folder that does not exist).
    ArtifactStoreUnreachable when the store does not answer."""
    folder = object_uri(*parts)
    try:
        response = _request("GET", folder, endpoint=PROXY_ENDPOINT, params={"path": folder[len(SCHEME):]})
    except ArtifactMissing:
        return []
    files = response.json().get("files", [])
    return [Entry(posixpath.join(folder, f["path"]), bool(f.get("is_dir"))) for f in files]


def delete_object(uri: str) -> bool:
    """Remove the object; False (and a warning) when that failed: a leftover object costs
    storage, never correctness (nothing points to it any more)."""
    try:
        _request("DELETE", uri)
    except ArtifactMissing:
        return True
    except (ArtifactStoreUnreachable, ValueError) as exc:
        log.warning("could not delete %s from the artifact store (it stays, unused): %s", uri, exc)
        return False
    return True
