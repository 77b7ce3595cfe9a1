"""The command lines of Descent's processes, defined once, and a way to run them as children.

Used by `make up` / `make demo` / `make api|worker|mlflow` and by the integration
tests, which start the same processes against PostgreSQL and Redis.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from jobs.settings import Settings

BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[1]


def mlflow_command(s: Settings) -> list[str]:
    return [
        str(BIN / "mlflow"), "server",
        "--host", "127.0.0.1", "--port", str(s.mlflow_port),
        "--backend-store-uri", s.mlflow_backend_store_uri,
        "--artifacts-destination", s.mlflow_artifacts_destination,
        "--serve-artifacts",
        "--workers", "1",
    ] + (["--app-name", "basic-auth"] if s.mlflow_auth_enabled else [])  # fmt: skip


def api_command(s: Settings) -> list[str]:
    """uvicorn, with API_WORKERS processes sharing the port (the kernel spreads connections
    over them); uvicorn's own supervisor starts a worker again when one dies. One process
    serves in-process, without a supervisor."""
    # Without a limit uvicorn's graceful shutdown waits for every open event stream to end.
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(s.api_port),
            "--timeout-graceful-shutdown", "3"] + (["--workers", str(s.api_workers)] if s.api_workers > 1 else [])  # fmt: skip


def worker_command(s: Settings, concurrency: int = 1, name: str = "worker", pool: str | None = None) -> list[str]:
    """A worker of `pool` (default: WORKER_POOL of the settings): the pool travels in its
    environment (`env WORKER_POOL=...`, which execs Celery: the same pid, the same
    process group), so that a restart by `make up` keeps it."""
    pool = pool or s.worker_pool
    return [
        "env", f"WORKER_POOL={pool}",
        str(BIN / "celery"), "-A", "worker.app", "worker",
        # Whether a child runs one job or many is worker/app.py's choice (CUDA builds: one).
        "--loglevel=INFO", "--pool=prefork", f"--concurrency={concurrency}",
        "-Q", f"{s.queue_name}.{pool}", "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip


def reaper_command() -> list[str]:
    return [sys.executable, "-m", "worker.reaper"]


def migrate_command() -> list[str]:
    return [str(BIN / "alembic"), "upgrade", "head"]


class ChildDied(RuntimeError):
    def __init__(self, child: ChildProcess) -> None:
        super().__init__(f"{child.name} {describe_exit(child.exit_code())}:\n{child.tail()}")


class StopRequested(Exception):
    """The launcher was asked to stop (a signal) while it waited for a child to be ready."""


# How `make up` restarts a child that died, as compose's `restart: unless-stopped`
# does: after a pause that doubles with each quick death (1, 2, 4 ... 60 s), back to
# the first pause once the child had run this long.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 60.0
RESTART_STABLE_AFTER_S = 30.0
# How long the children get between SIGTERM and SIGKILL: within `docker stop`'s 10 s,
# with room for the kill. A job cut short resumes from its checkpoint (its lease runs out).
STOP_GRACE_S = 5.0


@dataclass
class ChildProcess:
    name: str
    process: subprocess.Popen
    log_path: Path
    command: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    quick_deaths: int = 0  # deaths in a row, each before RESTART_STABLE_AFTER_S
    restart_at: float | None = None  # set while the child is dead and waits for its restart

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def exit_code(self) -> int | None:
        """The return code of the process we started once it has exited (negative: the
        signal that killed it), else None. It is not reaped: while it is a zombie its pid,
        the id of its process group, cannot go to another process, so the rest of the
        group can still be killed safely."""
        if self.process.returncode is not None:
            return self.process.returncode
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by a plain waitpid elsewhere
            return self.process.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with {returncode}"


@dataclass
class ProcessGroup:
    """Children started each in a process group of its own (its pid is the group's id,
    and whatever it forks, such as Celery's pool or MLflow's uvicorn, stays in it),
    stopped together. A process group dies whole: whenever one of ours ends, what is
    left of its group is SIGKILLed, so nothing outlives it holding a port or a job.

    An orphan guard (launcher/orphan_guard.py) watches this process: if it dies
    without stopping the children, even by SIGKILL, the guard kills their groups.

    `request_stop` is for signal handlers: the first call ends the waits for readiness
    (StopRequested) and the supervising loop; a second makes `stop_all` SIGKILL at once."""

    log_dir: Path
    env: Mapping[str, str]
    children: list[ChildProcess] = field(default_factory=list)
    stop_requested: bool = False
    hurry: bool = False
    _guard: subprocess.Popen | None = field(default=None, repr=False)
    _guard_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ starting

    def start(self, name: str, command: list[str]) -> ChildProcess:
        child = ChildProcess(name, self._spawn(name, command), self.log_dir / f"{name}.log", list(command))
        self.children.append(child)
        return child

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log_file:  # the child keeps its own copy
            process = subprocess.Popen(
                command, env=dict(self.env), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=REPO_ROOT,
            )  # fmt: skip
        self._tell_guard(f"+{process.pid}")
        return process

    # ------------------------------------------------------------------ supervising

    def restart_dead(self) -> list[str]:
        """One pass of `make up`'s supervision: a child found dead has what is left of its
        group killed and its restart scheduled; one whose time has come is started again
        (without waiting for it to be ready). Returns what happened, for the operator."""
        self.ensure_guard()
        now = time.monotonic()
        said = []
        for child in self.children:
            if child.restart_at is None and child.exit_code() is not None:
                self._end_group(child)
                ran_s = now - child.started_at
                child.quick_deaths = child.quick_deaths + 1 if ran_s < RESTART_STABLE_AFTER_S else 1
                delay_s = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** (child.quick_deaths - 1))
                child.restart_at = now + delay_s
                said.append(f"{child.name} {describe_exit(child.process.returncode)} after {ran_s:.0f} s; "
                            f"restarting it in {delay_s:g} s")  # fmt: skip
            elif child.restart_at is not None and now >= child.restart_at:
                with open(child.log_path, "ab") as log_file:
                    log_file.write(f"\n--- restarted by the launcher ({describe_exit(child.process.returncode)}) ---\n"
                                   .encode())  # fmt: skip
                child.process = self._spawn(child.name, child.command)
                child.started_at, child.restart_at = time.monotonic(), None
                child.restarts += 1
                said.append(f"{child.name} restarted (pid {child.process.pid}, restart {child.restarts})")
        return said

    def request_stop(self) -> None:
        """Safe in a signal handler: sets flags only (a lock taken here could be held by
        the very code the signal interrupted)."""
        if self.stop_requested:
            self.hurry = True
        self.stop_requested = True

    # ------------------------------------------------------------------ stopping

    def stop(self, child: ChildProcess, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        self._signal_group(child, sig)
        deadline = time.monotonic() + timeout_s
        while child.exit_code() is None and time.monotonic() < deadline and not self.hurry:
            time.sleep(0.05)
        self._end_group(child)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> list[str]:
        """SIGTERM to every group at once; SIGKILL to each group at the end of `grace_s`
        (or at once after a second `request_stop`), and to what a leader that ended by
        itself left behind. Returns, once every child has been reaped, the names of
        those still running when the SIGKILL came."""
        children = list(self.children)
        for child in children:
            self._signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(child.exit_code() is None for child in children) and time.monotonic() < deadline:
            if self.hurry:
                break
            time.sleep(0.05)
        killed = [child.name for child in children if child.exit_code() is None]
        for child in children:
            self._end_group(child)
            self.children.remove(child)
        self._close_guard()
        return killed

    def check_alive(self) -> None:
        for child in self.children:
            if child.exit_code() is not None:
                raise ChildDied(child)

    def _signal_group(self, child: ChildProcess, sig: int) -> None:
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
                os.killpg(child.process.pid, sig)

    def _end_group(self, child: ChildProcess) -> None:
        """SIGKILL the child's group (what is still in it), then reap the child."""
        if child.process.returncode is not None:
            return  # reaped before: its group id may belong to someone else by now
        self._signal_group(child, signal.SIGKILL)
        child.process.wait()
        self._tell_guard(f"-{child.process.pid}")

    # ------------------------------------------------------------------ the orphan guard

    def _tell_guard(self, line: str) -> None:
        """`+pgid` / `-pgid` to the guard. Under a lock: tests start and stop children from
        several threads, and a guard replaced unseen would take its groups down with it."""
        with self._guard_lock:
            for _ in range(2):
                if line.startswith("-") and (self._guard is None or self._guard.poll() is not None):
                    return  # a new guard has nothing to forget
                self._ensure_guard()
                try:
                    self._guard.stdin.write(f"{line}\n".encode())
                    self._guard.stdin.flush()
                    return
                except BrokenPipeError:  # it died between the check and the write
                    self._guard = None

    def ensure_guard(self) -> None:
        """Start the guard again if someone killed it (the supervising loop calls this)."""
        with self._guard_lock:
            if self._guard is not None:
                self._ensure_guard()

    def _ensure_guard(self) -> None:
        if self._guard is not None and self._guard.poll() is None:
            return
        self._guard = subprocess.Popen(
            [sys.executable, "-m", "launcher.orphan_guard"], stdin=subprocess.PIPE, cwd=REPO_ROOT,
            env=dict(self.env), start_new_session=True,  # out of reach of the terminal's Ctrl-C and hangup
        )  # fmt: skip
        for child in self.children:  # a replacement learns what its predecessor knew
            if child.process.returncode is None:
                self._guard.stdin.write(f"+{child.process.pid}\n".encode())

    def _close_guard(self) -> None:
        with self._guard_lock:
            if self._guard is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._guard.stdin.close()  # the end of its input with nothing listed: it exits
                self._guard.wait()
                self._guard = None


def run_migrations(env: Mapping[str, str]) -> None:
    subprocess.run(migrate_command(), env=dict(env), check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def wait_http(url: str, child: ChildProcess | None = None, timeout_s: float = 90.0,
              group: ProcessGroup | None = None) -> None:  # fmt: skip
    """Wait until `url` answers 200, failing early if the child process died (or
    with StopRequested if `group` is asked to stop meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child is not None and child.exit_code() is not None:
            raise ChildDied(child)
        if group is not None and group.stop_requested:
            raise StopRequested
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s" + (f":\n{child.tail()}" if child else ""))


def wait_worker_ready(child: ChildProcess, timeout_s: float = 90.0, group: ProcessGroup | None = None) -> None:
    """Celery prints 'ready.' once it consumes from the queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.exit_code() is not None:
            raise ChildDied(child)
        if group is not None and group.stop_requested:
            raise StopRequested
        if " ready." in child.tail(200):
            return
        time.sleep(0.3)
    raise TimeoutError(f"worker {child.name} was not ready within {timeout_s} s:\n{child.tail()}")
