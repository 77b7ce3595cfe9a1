"""Checkpoint objects in the artifact store that no row points to, found and deleted.

Descent writes an object before the row that points to it, and deletes a replaced object
only after the new row is committed (jobs/artifact_store.py). A crash or a store outage in
between leaves a checkpoint that nothing reads: the one of an attempt killed before its row,
a previous one whose delete failed. They cost storage, never correctness; this sweep
reclaims it.

Only the folders of jobs this database has are swept. An MLflow server may be shared by
several Descents (a team's server, a staging copy), and their objects share `descent/`: a
folder of a job this database does not know is another deployment's, never an orphan. For
the same reason uploads are not swept: an upload without its row (an API process that died
between the two, a delete that failed and was logged) cannot be told from another
deployment's; both are rare.

The rule: an object is deleted once no row has pointed to it at two sweeps at least
ARTIFACT_ORPHAN_GRACE_S (an hour) apart. An object being written has no row yet and gets one
within seconds of its upload, so the grace only has to outlast the longest upload. When a
sweep first saw each unused object is kept in Redis (the events URL), so that any reaper, or
`python -m worker.artifact_sweeper`, carries on where another left off; without Redis, in
this process's memory.

What is listed: `descent/checkpoints/<job>/` of every job of this database with objects,
except jobs this process already found ended with nothing unused (an ended job writes no
more). The reaper sweeps every ARTIFACT_SWEEP_INTERVAL_S in a thread of its own (listing a
large store takes a while, and recovery must not wait for it); with several reapers, a
Redis lease gives each interval's sweep to one.
"""

from __future__ import annotations

import argparse
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from jobs import artifact_store
from jobs.db import session_scope
from jobs.settings import settings
from jobs.stored_objects import jobs_objects

log = logging.getLogger("worker.artifact_sweeper")

JOBS_PER_QUERY = 1000


@dataclass
class SweepResult:
    listed: int = 0  # checkpoint objects of this database's jobs (those of jobs found clean earlier not counted)
    deleted: list[str] = field(default_factory=list)
    waiting: int = 0  # unused, not yet for the grace

    def summary(self) -> str:
        return (f"artifact store swept: {self.listed} checkpoint objects listed, {len(self.deleted)} unused ones deleted, "
                f"{self.waiting} unused ones waiting out the grace ({settings.artifact_orphan_grace_s:g} s)")  # fmt: skip


def _key(name: str) -> str:
    return ":".join(("descent", settings.queue_name, "artifact-sweep", name))


def _redis() -> redis.Redis | None:
    if not settings.events_url:
        return None
    return redis.Redis.from_url(settings.events_url, socket_connect_timeout=2, socket_timeout=5)


class ArtifactSweeper:
    def __init__(self, *, grace_s: float, client: redis.Redis | None, clock: Callable[[], float] = time.time) -> None:
        self.grace_s = grace_s
        self.client = client
        self.clock = clock
        self._unused_since: dict[str, float] = {}  # without Redis
        self._clean_ended_jobs: set[str] = set()

    @classmethod
    def from_settings(cls) -> ArtifactSweeper:
        return cls(grace_s=settings.artifact_orphan_grace_s, client=_redis())

    def take_turn(self, interval_s: float) -> bool:
        """Whether this process sweeps this interval (the first reaper to ask does)."""
        if self.client is None:
            return True
        return bool(self.client.set(_key("turn"), "1", nx=True, ex=max(1, int(interval_s * 0.9))))

    def sweep(self) -> SweepResult:
        """One pass. ArtifactStoreUnreachable (or a database or Redis error) leaves everything
        as it was; the next pass starts over."""
        result = SweepResult()
        now = self.clock()
        by_job = self._unused_checkpoints(result)
        unused = [uri for _, uris in by_job.values() for uri in uris]
        before = self._load()
        since: dict[str, float] = {}
        for uri in unused:
            first = before.get(uri, now)
            if now - first >= self.grace_s and artifact_store.delete_object(uri):
                result.deleted.append(uri)
            else:
                since[uri] = first
                result.waiting += 1
        self._save(since, before)
        for job, (ended, uris) in by_job.items():
            if ended and all(uri in result.deleted for uri in uris):
                self._clean_ended_jobs.add(job)
        return result

    def _unused_checkpoints(self, result: SweepResult) -> dict[str, tuple[bool, list[str]]]:
        """Per folder of a job of this database: whether the job has ended, and the objects in
        the folder that its checkpoint row does not point to."""
        folders = [posixpath.basename(e.uri) for e in artifact_store.list_folder("checkpoints") if e.is_folder]
        job_ids = [uuid.UUID(name) for name in folders if _is_uuid(name) and name not in self._clean_ended_jobs]
        found: dict[str, tuple[bool, list[str]]] = {}
        for start in range(0, len(job_ids), JOBS_PER_QUERY):
            chunk = job_ids[start : start + JOBS_PER_QUERY]
            # The rows are read before the folders are listed: an object whose row is committed
            # in between looks unused this once, and is in use at the next sweep.
            with session_scope() as session:
                known = jobs_objects(session=session, job_ids=chunk)
            for job_id, job in known.items():  # (a job not there is another deployment's)
                objects = [e.uri for e in artifact_store.list_folder("checkpoints", str(job_id)) if not e.is_folder]
                result.listed += len(objects)
                found[str(job_id)] = (job.ended, [uri for uri in objects if uri != job.checkpoint_uri])
        return found

    def _load(self) -> dict[str, float]:
        if self.client is None:
            return dict(self._unused_since)
        return {k.decode(): float(v) for k, v in self.client.hgetall(_key("unused-since")).items()}

    def _save(self, since: dict[str, float], before: dict[str, float]) -> None:
        """Record `since`, dropping what is no longer unused. Field by field, not the whole
        hash at once: a sweep running beside this one (the command line beside a reaper)
        then at worst leaves a stale field, which the next sweep drops."""
        if self.client is None:
            self._unused_since = since
            return
        gone = [uri for uri in before if uri not in since]
        with self.client.pipeline(transaction=True) as pipe:
            if gone:
                pipe.hdel(_key("unused-since"), *gone)
            for uri, first in since.items():
                pipe.hsetnx(_key("unused-since"), uri, first)
            pipe.execute()


def _is_uuid(name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return True


def sweep_periodically(stop: threading.Event) -> None:
    """The reaper's sweeping thread: every ARTIFACT_SWEEP_INTERVAL_S, one sweep (when this
    reaper has the turn); a failed one is logged and the next interval tries again."""
    interval = settings.artifact_sweep_interval_s
    sweeper = ArtifactSweeper.from_settings()
    while not stop.wait(interval):
        try:
            if sweeper.take_turn(interval):
                log.info(sweeper.sweep().summary())
        except Exception as exc:  # noqa: BLE001 - the store, the database or Redis down: next interval
            log.warning("the artifact store sweep failed (%s: %s); trying again in %.0f s",
                        type(exc).__name__, exc, interval)  # fmt: skip


def start_sweeping(stop: threading.Event) -> threading.Thread | None:
    if settings.artifact_sweep_interval_s <= 0:
        return None
    thread = threading.Thread(target=sweep_periodically, args=(stop,), name="artifact-sweeper", daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description="Sweep MLflow's artifact store once, now: delete Descent's "
                                     "objects that no row has pointed to for ARTIFACT_ORPHAN_GRACE_S.")  # fmt: skip
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = ArtifactSweeper.from_settings().sweep()
    print(result.summary())
    for uri in result.deleted:
        print(f"deleted {uri}")


if __name__ == "__main__":
    main()
