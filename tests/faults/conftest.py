"""The real stack for fault injection: like tests/integration's, but with a Redis of
its own (a `redis-server` child on a spare port, so that killing it leaves the
machine's Redis alone), several worker processes, and handles to hurt each part."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from mlflow.tracking import MlflowClient

from jobs.settings import Settings
from launcher.processes import ChildProcess, ProcessGroup, mlflow_command, wait_http, wait_worker_ready, worker_command
from launcher.stack import start_stack
from tests.integration.conftest import ADMIN_KEY, TERMINAL, JobCalls, free_port, make_database, pg_url  # noqa: F401

WORKERS = 3
CONCURRENCY = 1  # one job per worker process: a SIGKILL takes down exactly the jobs of one worker


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, [state, ppid, pgrp, ...]) of every process, from /proc/<pid>/stat (Linux)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        yield int(entry), stat[stat.rindex(")") + 2 :].split()


def process_group_members(pgid: int) -> set[int]:
    """The pids of a process group."""
    return {pid for pid, fields in process_stats() if int(fields[2]) == pgid}


class ProcessWatch(threading.Thread):
    """When each process on the machine was last seen alive (a zombie is dead), sampled
    every `interval_s`: whether a job's earlier attempt still lived when the reaper gave
    the job to another one. Whoever killed it (the test, or Celery's own pool)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(name="process-watch", daemon=True)
        self.interval_s = interval_s
        self.last_alive: dict[int, float] = {}
        self.groups: dict[int, int] = {}  # pid -> its process group (a worker's: the Celery parent's pid)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        now = time.time()
        for pid, fields in process_stats():
            if fields[0] not in ("Z", "X"):
                self.last_alive[pid] = now
                self.groups[pid] = int(fields[2])

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


class RedisServer:
    """A `redis-server` child without persistence: a restart comes back empty, every
    message in it lost, as after a crash of a broker without a disk."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.restarts = 0  # counted by whoever starts it again

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: see {self.log_path}")
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer within {timeout_s} s")
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@dataclass
class ChaosStack(JobCalls):
    settings: Settings
    group: ProcessGroup
    redis: RedisServer
    api: httpx.Client
    mlflow: MlflowClient
    log_dir: Path
    watch: ProcessWatch
    worker_kills: list[str] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)  # every process those kills ended
    mlflow_restarts: int = 0
    _next_worker: int = 1  # start_stack names its workers worker-0, worker-1, ...
    # Every worker's device pool, by its process group (the Celery parent's pid), dead ones too.
    pool_of_group: dict[int, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ reading

    def workers(self) -> list[ChildProcess]:
        return [c for c in self.group.children if c.name.startswith("worker-")]

    # ------------------------------------------------------------------ hurting

    def kill_worker(self, worker: ChildProcess) -> set[int]:
        """SIGKILL the Celery parent and its forked pool processes together (they share
        its process group): no cleanup, no goodbye, no message handed back to Redis.
        The group is stopped first so that no process forked in between escapes the
        count; returns the pids killed."""
        pgid = worker.process.pid
        try:
            os.killpg(pgid, signal.SIGSTOP)
            pids = process_group_members(pgid)
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pids = set()
        worker.process.wait()
        self.group.children.remove(worker)
        self.worker_kills.append(worker.name)
        self.killed_pids |= pids
        return pids

    def start_worker(self, wait: bool = True, pool: str | None = None) -> ChildProcess:
        """A replacement, so that capacity stays: a new name, so each has its own log."""
        name = f"worker-{self._next_worker}"
        self._next_worker += 1
        pool = pool or self.settings.worker_pool
        worker = self.group.start(name, worker_command(self.settings, CONCURRENCY, name=name, pool=pool))
        self.pool_of_group[worker.process.pid] = pool
        if wait:
            wait_worker_ready(worker)
        return worker

    def restart_mlflow(self, down_s: float) -> None:
        server = next(c for c in self.group.children if c.name == "mlflow")
        self.group.stop(server)
        time.sleep(down_s)
        restarted = self.group.start("mlflow", mlflow_command(self.settings))  # same store, same port
        wait_http(f"{self.settings.mlflow_tracking_uri}/health", restarted, timeout_s=120)
        self.mlflow_restarts += 1


@contextmanager
def open_chaos_stack(make_database, home: Path, worker_pools: list[str], **overrides) -> Iterator[ChaosStack]:  # noqa: ANN001, F811
    """A stack with a Redis of its own and one worker per entry of `worker_pools` (serving
    that device pool), the faults' handles on it; `overrides`: settings on top."""
    log_dir = Path(home) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = RedisServer(free_port(), log_dir / "redis.log")
    broker.start()
    group: ProcessGroup | None = None
    try:
        settings = Settings(
            descent_home=home,
            database_url=pg_url(make_database("descent_chaos")),
            broker_url=broker.url,
            queue_name=f"descent-chaos-{uuid.uuid4().hex[:8]}",
            mlflow_port=free_port(),
            api_port=free_port(),
            mlflow_backend_store_uri=pg_url(make_database("descent_chaos_mlflow")),
            mlflow_artifacts_destination=str(Path(home) / "mlartifacts"),
            # Short leases and frequent recovery passes, so a killed worker is noticed in seconds.
            lease_s=3.0,
            reaper_interval_s=1.0,
            unclaimed_requeue_s=5.0,
            checkpoint_min_interval_s=0.0,
            bootstrap_key=ADMIN_KEY,
            **overrides,
        )
        # start_stack starts the workers side by side (each takes seconds to import torch).
        group = start_stack(settings, log_dir, concurrency=CONCURRENCY, worker_pools=worker_pools)
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:  # fmt: skip
            watch = ProcessWatch()
            watch.start()
            stack = ChaosStack(settings, group, broker, api, MlflowClient(settings.mlflow_tracking_uri), log_dir, watch,
                               _next_worker=len(worker_pools))  # fmt: skip
            stack.pool_of_group = {w.process.pid: pool for w, pool in zip(stack.workers(), worker_pools)}
            try:
                yield stack
            finally:
                watch.stop()
    finally:
        if group is not None:
            group.stop_all()
        broker.kill()
        print("chaos stack logs:", *sorted(log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def chaos_stack(make_database, tmp_path_factory) -> Iterator[ChaosStack]:  # noqa: F811 - the re-exported fixture
    with open_chaos_stack(make_database, tmp_path_factory.mktemp("descent-chaos"), ["default"] * WORKERS) as stack:
        yield stack
