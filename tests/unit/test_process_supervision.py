"""launcher.processes.ProcessGroup as `make up` uses it, with small Python children
instead of the stack (Linux: reads /proc). The real stack: tests/security/test_supervisor.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import processes
from launcher.processes import ProcessGroup

# Ignores SIGTERM, as a worker in a warm shutdown waiting for a job does; forks a
# grandchild into its process group, as Celery's pool does; prints both pids.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = os.fork()
if grandchild == 0:
    while True: time.sleep(1)
print(os.getpid(), grandchild, flush=True)
while True: time.sleep(1)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def gone(*pids: int, within_s: float = 2.0) -> bool:
    """Whether the processes are dead within `within_s` (a SIGKILL takes effect when the
    process next runs, a moment later on a busy machine)."""
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_pids(log: Path) -> tuple[int, int]:
    """The pids STUBBORN printed: its own and its grandchild's (the last such line)."""
    deadline = time.monotonic() + 20
    while True:
        printed = [line.split() for line in log.read_text().splitlines() if line[:1].isdigit()] if log.exists() else []
        if printed:
            leader, grandchild = map(int, printed[-1])
            return leader, grandchild
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)


def test_stop_all_kills_what_ignores_sigterm_at_the_grace_and_its_group(tmp_path) -> None:
    group = ProcessGroup(tmp_path, dict(os.environ))
    group.start("stubborn", [sys.executable, "-c", STUBBORN])
    leader, grandchild = wait_pids(tmp_path / "stubborn.log")
    t0 = time.monotonic()
    assert group.stop_all(grace_s=1.0) == ["stubborn"]
    assert 1.0 <= time.monotonic() - t0 < 3.0
    assert gone(leader, grandchild)
    assert group.children == []


def test_a_second_stop_request_kills_at_once(tmp_path) -> None:
    group = ProcessGroup(tmp_path, dict(os.environ))
    group.start("stubborn", [sys.executable, "-c", STUBBORN])
    leader, grandchild = wait_pids(tmp_path / "stubborn.log")
    group.request_stop()
    group.request_stop()
    t0 = time.monotonic()
    group.stop_all(grace_s=60.0)
    assert time.monotonic() - t0 < 2.0
    assert gone(leader, grandchild)


def test_a_dead_child_is_restarted_after_a_doubling_pause_and_its_group_killed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(processes, "RESTART_FIRST_DELAY_S", 0.2)
    group = ProcessGroup(tmp_path, dict(os.environ))
    child = group.start("stubborn", [sys.executable, "-c", STUBBORN])
    try:
        for restart in range(1, 4):
            log = tmp_path / "stubborn.log"
            leader, grandchild = wait_pids(log)
            log.write_text("")
            os.kill(leader, signal.SIGKILL)  # the leader alone: its grandchild is left behind
            deadline = time.monotonic() + 5
            while not (said := group.restart_dead()):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert said == [f"stubborn was killed by SIGKILL after 0 s; restarting it in {0.2 * 2 ** (restart - 1):g} s"]
            assert gone(grandchild), "what the dead child left in its group lives on"
            died_at = time.monotonic()
            while child.restarts < restart:
                group.restart_dead()
                time.sleep(0.02)
            assert time.monotonic() - died_at >= 0.2 * 2 ** (restart - 1) - 0.05
    finally:
        group.stop_all(grace_s=0.0)


OWNER = """
import os, sys
from pathlib import Path
from launcher.processes import ProcessGroup
group = ProcessGroup(Path(sys.argv[1]), dict(os.environ))
group.start("stubborn", [sys.executable, "-c", sys.argv[2]])
print("started", flush=True)
sys.stdin.read()  # until the test kills it
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_children_die_with_their_launcher_however_it_dies(tmp_path, how) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), STUBBORN], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=processes.REPO_ROOT)  # fmt: skip
    try:
        assert owner.stdout.readline() == b"started\n"
        leader, grandchild = wait_pids(tmp_path / "stubborn.log")
        owner.send_signal(how)  # SIGTERM: no handler, so no stop_all either
        owner.wait(10)
        assert gone(leader, grandchild, within_s=5.0), "a child outlived its launcher"
    finally:
        owner.kill()
        owner.wait()
