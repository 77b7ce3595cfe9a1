"""Kills a launcher's children when the launcher dies without stopping them.

`python -m launcher.orphan_guard`, started by launcher.processes.ProcessGroup with a
pipe as its standard input; the launcher writes `+<pgid>` for each process group it
starts and `-<pgid>` for each one it has ended. The pipe's only writer is the
launcher, so the end of the input means the launcher is gone, however it went
(SIGKILL included: the kernel closes a dead process's files). Then every group still
listed is SIGKILLed: the child, and what it forked (Celery's pool, MLflow's uvicorn).

A separate process rather than PR_SET_PDEATHSIG in each child: the death signal
reaches only the child itself (not what it forks), and it fires when the *thread*
that started the child ends, which would kill children started from a short-lived
thread of a long-lived launcher.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def main() -> None:
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        line = line.strip()
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    main()
