"""Issue 14, item 7: `make up` as a supervisor.

Each test starts `python -m launcher.up` (what `make up` runs) as a process of its
own against PostgreSQL and Redis, and hurts it the way a machine or an operator does:
the OOM killer takes the Celery parent; `docker stop`/systemd sends SIGTERM with a
job running and a client following it; an impatient operator presses Ctrl-C twice;
the launcher itself is SIGKILLed. Before the fix a dead worker stopped the whole stack
(API included), a stop took 20 s a process, a second signal abandoned the children
holding their ports, and a SIGKILLed launcher left every child running.

Processes are read from /proc (Linux): the stack is the launcher's descendants and
every member of their process groups, each known by pid and start time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import process_stats
from tests.integration.conftest import ADMIN_KEY, REDIS_URL, TERMINAL, free_port, pg_url
from tests.integration.test_job_lifecycle import DIGITS_ADAM

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300  # migrations, MLflow, the API and a worker importing torch, on a busy machine
STOP_DEADLINE_S = 10.0  # the issue's bound: `docker stop`'s default
LONG_JOB = DIGITS_ADAM | {"name": "sup-long", "epochs": 5000, "checkpoint_every_steps": 50}
SHORT_JOB = DIGITS_ADAM | {"name": "sup-short", "epochs": 3}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start_time: str  # /proc/<pid>/stat field 22: with the pid, names one process for good
    cmdline: str

    def alive(self) -> bool:
        """Whether any of its threads still runs: a process whose main thread has ended
        shows as a zombie while its other threads, and its open sockets, live on."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            threads = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return False
        if stat[stat.rindex(")") + 2 :].split()[19] != self.start_time:
            return False  # another process with the same pid
        for tid in threads:
            try:
                thread_stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            if thread_stat[thread_stat.rindex(")") + 2] not in "ZX":
                return True
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def stack_processes(launcher_pid: int) -> dict[int, Proc]:
    """The launcher, its descendants, and every member of their process groups (a
    process whose parent died is still found through its group)."""
    stats = {pid: fields for pid, fields in process_stats() if fields[0] not in ("Z", "X")}
    found = {launcher_pid} if launcher_pid in stats else set()
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, fields in stats.items():
            if int(fields[1]) == parent and pid not in found:
                found.add(pid)
                frontier.append(pid)
    groups = {int(stats[pid][2]) for pid in found}
    found |= {pid for pid, fields in stats.items() if int(fields[2]) in groups}
    return {pid: Proc(pid, int(stats[pid][1]), stats[pid][19], cmdline(pid)) for pid in found}


def bound_ports(ports: dict[str, int]) -> dict[str, str]:
    """Those of `ports` the next `make up` could not listen on (uvicorn sets SO_REUSEADDR
    too), with what `ss` says holds them."""
    busy = {}
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
                continue
            except OSError as exc:
                error = str(exc)
        sockets = subprocess.run(["ss", "-tanpH", f"sport = :{port}"], capture_output=True, text=True).stdout
        busy[name] = f"{port}: {error}; {sockets.strip() or 'no socket listed'}"
    return busy


@dataclass
class Launcher:
    """A running `python -m launcher.up` and what it started."""

    process: subprocess.Popen
    output: Path
    ports: dict[str, int]
    api: httpx.Client
    seen: dict[int, Proc] = field(default_factory=dict)  # every stack process seen, for the cleanup

    def processes(self) -> dict[int, Proc]:
        now = stack_processes(self.process.pid)
        self.seen |= now
        return now

    def children_named(self, word: str) -> list[Proc]:
        return [p for p in self.processes().values() if p.ppid == self.process.pid and word in p.cmdline]

    def say(self) -> str:
        return self.output.read_text(errors="replace")

    def submit(self, spec: dict) -> str:
        response = self.api.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def wait_job(self, job_id: str, done: Callable[[dict], bool], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            if done(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout_s} s:\n{self.say()}"
            time.sleep(0.3)

    def wait_running(self, job_id: str) -> None:
        self.wait_job(job_id, lambda job: job["status"] == "running" and job["progress"]["step"] > 0, 180)

    def wait_stack_gone(self, processes: dict[int, Proc], timeout_s: float) -> tuple[float, list[Proc]]:
        """Seconds until none of `processes` lives (and the launcher has exited), or the survivors."""
        t0 = time.monotonic()
        while True:
            self.process.poll()
            left = [p for p in processes.values() if p.alive()]
            if not left:
                took_s = time.monotonic() - t0
                self.process.wait(timeout_s)  # a zombie at least by now: reap it, for its return code
                return took_s, []
            if time.monotonic() - t0 > timeout_s:
                return time.monotonic() - t0, left


class EventsFollower(threading.Thread):
    """A client following a job's Server-Sent Events, as `descent watch` does: an open
    response that a graceful server shutdown waits for."""

    def __init__(self, launcher: Launcher, job_id: str) -> None:
        super().__init__(name="events-follower", daemon=True)
        self.launcher, self.job_id = launcher, job_id
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            with self.launcher.api.stream("GET", f"/v1/jobs/{self.job_id}/events", timeout=None) as response:
                self.connected.set()
                for _ in response.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass  # the server went away: what the stop is for


@pytest.fixture
def start_launcher(make_database, tmp_path) -> Iterator[Callable[[], Launcher]]:
    launchers: list[Launcher] = []

    def start() -> Launcher:
        home = tmp_path / f"home-{len(launchers)}"
        ports = {"api": free_port(), "mlflow": free_port(), "worker metrics": free_port()}
        env = os.environ | {
            "PYTHONPATH": str(REPO_ROOT),  # the children run this checkout's code
            "DESCENT_HOME": str(home),
            "DATABASE_URL": pg_url(make_database("descent_sup")),
            "MLFLOW_BACKEND_STORE_URI": pg_url(make_database("descent_sup_mlflow")),
            "BROKER_URL": REDIS_URL,
            "QUEUE_NAME": f"descent-sup-{uuid.uuid4().hex[:8]}",
            "API_PORT": str(ports["api"]),
            "MLFLOW_PORT": str(ports["mlflow"]),
            "WORKER_METRICS_PORT": str(ports["worker metrics"]),
            "DESCENT_BOOTSTRAP_KEY": ADMIN_KEY,
            "LEASE_S": "3",
            "REAPER_INTERVAL_S": "1",
            "CHECKPOINT_MIN_INTERVAL_S": "0",
        }
        home.mkdir()
        output = home / "make-up.out"
        with open(output, "wb") as out:
            # A session of its own, as a shell's job: signals to the test's group don't reach it.
            process = subprocess.Popen([sys.executable, "-m", "launcher.up"], env=env, cwd=REPO_ROOT,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        api = httpx.Client(base_url=f"http://127.0.0.1:{ports['api']}", timeout=30,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
        launcher = Launcher(process, output, ports, api)
        launchers.append(launcher)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Ctrl-C stops everything" not in launcher.say():
            assert process.poll() is None, f"make up exited with {process.returncode}:\n{launcher.say()}"
            assert time.monotonic() < deadline, f"make up not ready after {READY_TIMEOUT_S} s:\n{launcher.say()}"
            time.sleep(0.5)
        launcher.processes()
        return launcher

    yield start
    for launcher in launchers:  # whatever a failed test left: nothing may outlive it
        launcher.api.close()
        launcher.processes()
        for proc in launcher.seen.values():
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
        launcher.process.wait()
        print(f"make up output: {launcher.output}; logs in {launcher.output.parent / 'logs'}")


def test_a_killed_worker_comes_back_and_the_api_stays_up(start_launcher) -> None:
    launcher = start_launcher()
    [worker] = launcher.children_named("celery")
    [api] = launcher.children_named("api.main:app")
    pool = [p for p in launcher.processes().values() if p.ppid == worker.pid]
    assert pool, "the Celery worker has no pool process"

    health_failures: list[str] = []
    watching = threading.Event()
    watching.set()

    def watch_health() -> None:
        while watching.is_set():
            try:
                status = launcher.api.get("/healthz", timeout=5).status_code
                if status != 200:
                    health_failures.append(f"/healthz {status}")
            except httpx.HTTPError as exc:
                health_failures.append(f"/healthz {type(exc).__name__}")
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        os.kill(worker.pid, signal.SIGKILL)  # the Celery parent alone, as the OOM killer would pick it
        deadline = time.monotonic() + 30
        while not [w for w in launcher.children_named("celery") if w.pid != worker.pid]:
            assert launcher.process.poll() is None, f"make up exited:\n{launcher.say()}"
            assert time.monotonic() < deadline, f"no new worker 30 s after the kill:\n{launcher.say()}"
            time.sleep(0.2)
        assert not [p for p in pool if p.alive()], "the dead worker's pool processes outlived it"

        job = launcher.wait_job(launcher.submit(SHORT_JOB), lambda job: job["status"] in TERMINAL, 300)
        assert job["status"] == "succeeded", job["error"]
    finally:
        watching.clear()
        watcher.join()
    assert launcher.process.poll() is None, f"make up exited:\n{launcher.say()}"
    assert api.alive(), "the API was restarted, or stopped"
    assert not health_failures, f"the API stopped answering: {health_failures[:5]}"
    assert "worker-0 was killed by SIGKILL" in launcher.say()


def test_sigterm_stops_everything_within_10_s_with_a_job_running(start_launcher) -> None:
    launcher = start_launcher()
    job_id = launcher.submit(LONG_JOB)
    launcher.wait_running(job_id)
    follower = EventsFollower(launcher, job_id)
    follower.start()
    assert follower.connected.wait(30), "could not follow the job's events"
    stack = launcher.processes()

    launcher.process.send_signal(signal.SIGTERM)
    took_s, left = launcher.wait_stack_gone(stack, STOP_DEADLINE_S)
    assert not left, f"still running {took_s:.1f} s after SIGTERM: {[p.cmdline[:80] for p in left]}"
    assert launcher.process.returncode == 0, launcher.say()
    busy = bound_ports(launcher.ports)
    assert not busy, f"ports still bound after the stop: {busy}"
    print(f"stopped in {took_s:.1f} s")


def test_a_second_signal_hurries_the_stop_and_abandons_nothing(start_launcher) -> None:
    launcher = start_launcher()
    job_id = launcher.submit(LONG_JOB)
    launcher.wait_running(job_id)
    follower = EventsFollower(launcher, job_id)  # keeps the API from stopping at once on SIGTERM
    follower.start()
    assert follower.connected.wait(30), "could not follow the job's events"
    stack = launcher.processes()
    children = {pid: p for pid, p in stack.items() if pid != launcher.process.pid}

    launcher.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    launcher.process.send_signal(signal.SIGINT)  # Ctrl-C, impatient
    took_s, left = launcher.wait_stack_gone(children, 3.0)
    assert not left, f"still running {took_s:.1f} s after the second signal: {[p.cmdline[:80] for p in left]}"
    took_s, left = launcher.wait_stack_gone(stack, STOP_DEADLINE_S - 1.0)
    assert not left, "make up did not exit"
    assert launcher.process.returncode == 0, f"make up gave up on its stop:\n{launcher.say()}"
    busy = bound_ports(launcher.ports)
    assert not busy, f"ports still bound after the stop: {busy}"


def test_children_die_with_a_sigkilled_launcher(start_launcher) -> None:
    launcher = start_launcher()
    stack = launcher.processes()
    [worker] = launcher.children_named("celery")
    [mlflow] = launcher.children_named("mlflow server")
    assert [p for p in stack.values() if p.ppid == worker.pid], "no Celery pool process to check"
    assert [p for p in stack.values() if p.ppid == mlflow.pid], "no MLflow server process to check"

    launcher.process.kill()
    took_s, left = launcher.wait_stack_gone(stack, 5.0)
    assert not left, f"outlived the launcher by {took_s:.1f} s: {[p.cmdline[:80] for p in left]}"
    busy = bound_ports(launcher.ports)
    assert not busy, f"ports still bound: {busy}"
