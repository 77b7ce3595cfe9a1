"""The command lines of Descent's processes, defined once, and a way to run them as children.

Used by `make up` / `make demo` / `make api|worker|mlflow` and by the integration
tests, which start the same processes against PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jobs.settings import Settings

BIN = Path(sys.executable).parent


def mlflow_command(s: Settings) -> list[str]:
    return [
        str(BIN / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(s.mlflow_port),
        "--backend-store-uri", s.mlflow_backend_store_uri,
        "--artifacts-destination", s.mlflow_artifacts_destination,
        "--serve-artifacts",
        "--workers", "1",
    ]  # fmt: skip


def api_command(s: Settings) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(s.api_port)]


def worker_command(s: Settings, concurrency: int = 1, name: str = "worker") -> list[str]:
    return [
        str(BIN / "celery"), "-A", "worker.app", "worker",
        # Whether a child runs one job or many is worker/app.py's choice (CUDA builds: one).
        "--loglevel=INFO", "--pool=prefork", f"--concurrency={concurrency}",
        "-Q", s.queue_name, "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def reaper_command() -> list[str]:
    return [sys.executable, "-m", "worker.reaper"]


def migrate_command() -> list[str]:
    return [str(BIN / "alembic"), "upgrade", "head"]


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Children started in their own process groups, stopped together."""

    log_dir: Path
    env: Mapping[str, str]
    children: list[ChildProcess] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> ChildProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        process = subprocess.Popen(
            command, env=dict(self.env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        child = ChildProcess(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self, child: ChildProcess, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        if child.process.poll() is None:
            try:
                os.killpg(child.process.pid, sig)
                child.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
            except ProcessLookupError:
                pass
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")


def run_migrations(env: Mapping[str, str]) -> None:
    subprocess.run(migrate_command(), env=dict(env), check=True, cwd=Path(__file__).resolve().parents[1],
                   stdout=subprocess.DEVNULL)  # fmt: skip


def wait_http(url: str, child: ChildProcess | None = None, timeout_s: float = 90.0) -> None:
    """Wait until `url` answers 200, failing early if the child process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s" + (f":\n{child.tail()}" if child else ""))


def wait_worker_ready(child: ChildProcess, timeout_s: float = 90.0) -> None:
    """Celery prints 'ready.' once it consumes from the queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        if " ready." in child.tail(200):
            return
        time.sleep(0.3)
    raise TimeoutError(f"worker {child.name} was not ready within {timeout_s} s:\n{child.tail()}")
