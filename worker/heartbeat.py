"""A worker's heartbeats: `python -m worker.heartbeat <name> <pool> <concurrency> <parent pid> [again]`.

The Celery parent (worker/app.py) starts this process once it is ready. Every
WORKER_HEARTBEAT_INTERVAL_S it writes the worker's row in `workers` (its pool, its
devices, now), which GET /v1/pools and the waiting reason of a queued job read. A
process of its own, not a thread in the Celery parent: that parent forks job processes,
and a fork while another thread holds a lock (a database driver's, logging's) can hang
the child (the reaper is a process of its own for the same reason).

It ends when its parent does: a SIGTERM from the parent's clean shutdown marks the
worker stopped; a parent that died without a word (SIGKILL, OOM) leaves the row to go
stale, three missed heartbeats later. Started in the parent's process group, a kill of
the whole group (compose, the launcher, the fault tests) takes it too. If this process
alone dies, the parent starts another (`again`: the worker did not start anew, so its
start time stays).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any

import psutil

from jobs.db import session_scope
from jobs.pools import record_heartbeat, record_stopped
from jobs.settings import settings

log = logging.getLogger("worker.heartbeat")
REGISTERED = "registered"  # the line the parent waits for: the first heartbeat is in the database
AGAIN = "again"  # the last argument of a heartbeat process that replaces one that died


def visible_gpu_indices() -> set[str] | None:
    """The GPUs CUDA_VISIBLE_DEVICES lets this worker's jobs see (indices or UUIDs); None: all."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return None
    return {part.strip() for part in visible.split(",") if part.strip() and part.strip() != "-1"}


def detect_devices() -> list[dict[str, Any]]:
    """[{kind, name, memory_mb}]: the GPUs nvidia-smi lists (without touching CUDA, so that no
    process here holds a CUDA context), else the machine's CPU and memory."""
    gpus: list[dict[str, Any]] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            visible = visible_gpu_indices()
            for line in out.strip().splitlines():
                index, uuid, name, memory = (part.strip() for part in line.split(",", 3))
                if visible is None or index in visible or uuid in visible:
                    gpus.append({"kind": "cuda", "name": name, "memory_mb": int(float(memory))})
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("nvidia-smi did not list the GPUs (%s); reporting the CPU", exc)
    if gpus:
        return gpus
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [{"kind": "cpu", "name": f"{cores} cores", "memory_mb": psutil.virtual_memory().total // 2**20}]


def beat(name: str, pool: str, concurrency: int, devices: list[dict[str, Any]], starting: bool = False) -> bool:
    try:
        with session_scope() as session:
            record_heartbeat(session=session, name=name, pool=pool, devices=devices, concurrency=concurrency,
                             starting=starting)  # fmt: skip
        return True
    except Exception as exc:  # noqa: BLE001 - the database down: the next beat tries again
        log.warning("heartbeat of %s not recorded: %s", name, exc)
        return False


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name, pool, concurrency, parent = argv[0], argv[1], int(argv[2]), int(argv[3])
    again = argv[4:] == [AGAIN]
    stop = threading.Event()
    stopped_cleanly = threading.Event()

    def on_term(*_: object) -> None:
        stopped_cleanly.set()
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the parent, which then stops this
    devices = detect_devices()
    registered = False
    while not stop.is_set():
        if os.getppid() != parent:  # the parent died without stopping this: stop beating
            return 0
        if beat(name, pool, concurrency, devices, starting=not (registered or again)) and not registered:
            registered = True
            log.info("worker %s serves pool '%s' with %s", name, pool, devices)
            try:
                print(REGISTERED, flush=True)
                sys.stdout.close()  # the parent stops reading after this line
            except OSError:  # the parent stopped waiting (the database was slow): beat on all the same
                pass
        stop.wait(settings.worker_heartbeat_interval_s)
    if stopped_cleanly.is_set():
        try:
            with session_scope() as session:
                record_stopped(session=session, name=name)
        except Exception as exc:  # noqa: BLE001 - the row goes stale by itself
            log.warning("could not mark %s stopped: %s", name, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
