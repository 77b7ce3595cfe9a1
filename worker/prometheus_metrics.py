"""Per-worker Prometheus metrics: how long jobs take and how they end, the running
jobs' steps per second, and GPU memory when a job uses CUDA.

Jobs run in prefork children, a fresh child per job, and a child's memory dies with
it, so the numbers live in prometheus_client's multiprocess mode
(https://prometheus.github.io/client_python/multiprocess/): every child writes its
metrics to files in PROMETHEUS_MULTIPROC_DIR, and the worker's main process serves
/metrics on `worker_metrics_port` from the union of those files (MultiProcessCollector).
Counters and histograms of finished children stay in the sum; the live gauges
(steps/s, GPU memory) of a child that has exited are dropped (mark_process_dead),
also when it was killed and could not say so itself.

The main process only reads files: it never touches torch, let alone CUDA
(PITFALLS 5: a parent that initialised CUDA breaks every forked child). GPU memory is
read in the child that runs the job, and only once that job has initialised CUDA.

prometheus_client picks its value store when it is imported and each metric when it
is built: the directory is set before either happens in the parent, and children
build their metrics after the fork (`job_metrics()`).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Training jobs run from seconds to a day.
DURATION_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
RATE_WINDOW_S = 10.0  # steps/s is measured over this much recent time
SAMPLE_INTERVAL_S = 1.0


class JobMetrics:
    """The metrics one job records. `registry=None`: recorded to the multiprocess files
    only (the parent serves them); a registry: recorded in memory (tests)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.jobs = Counter(
            "descent_worker_jobs", "Job deliveries this worker handled, by outcome (skipped: a duplicate "
            "delivery or a job cancelled while queued; lost: another attempt carries the job on).",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "descent_worker_job_duration_seconds", "Wall time of a job's attempt on this worker, claim to outcome.",
            ["outcome"], buckets=DURATION_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.steps_per_second = Gauge(
            "descent_worker_job_steps_per_second",
            f"Training steps per second of a running job (last {RATE_WINDOW_S:g} s).",
            ["job_id"], multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.gpu_allocated = Gauge(
            "descent_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors of the running jobs.",
            ["device"], multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.gpu_reserved = Gauge(
            "descent_worker_gpu_memory_reserved_bytes", "GPU memory reserved by the running jobs' caching allocators.",
            ["device"], multiprocess_mode="livesum", registry=registry,
        )  # fmt: skip
        self.gpu_peak = Gauge(
            "descent_worker_gpu_memory_peak_bytes", "Most GPU memory a running job's tensors have held so far "
            "(the largest over the running jobs).",
            ["device"], multiprocess_mode="livemax", registry=registry,
        )  # fmt: skip

    def record_outcome(self, outcome: str, seconds: float) -> None:
        self.jobs.labels(outcome).inc()
        if outcome != "skipped":  # nothing ran
            self.duration.labels(outcome).observe(seconds)

    def record_gpu_memory(self) -> None:
        for device, allocated, reserved, peak in gpu_memory():
            self.gpu_allocated.labels(device).set(allocated)
            self.gpu_reserved.labels(device).set(reserved)
            self.gpu_peak.labels(device).set(peak)


def gpu_memory() -> list[tuple[str, int, int, int]]:
    """(device, allocated, reserved, peak) bytes of the device this process uses;
    nothing unless this process has initialised CUDA itself (this never initialises it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return []
    index = torch.cuda.current_device()
    cuda = torch.cuda
    return [(str(index), cuda.memory_allocated(index), cuda.memory_reserved(index), cuda.max_memory_allocated(index))]


def enabled() -> bool:
    """True in a worker whose main process serves /metrics (it set the directory before forking)."""
    return bool(os.environ.get(MULTIPROC_ENV))


@lru_cache(maxsize=1)
def job_metrics() -> JobMetrics | None:
    """This process's metrics, built on first use (in a job's child: after the fork)."""
    return JobMetrics() if enabled() else None


def drop_live_gauges() -> None:
    """A job is over: its live gauges (steps/s, GPU memory) go now. prometheus_client
    cannot remove a label in multiprocess mode, and a child that runs job after job would
    list every job it ran at 0 until it exits; so this process's live-gauge files are
    deleted and its metrics rebuilt at the next job. Counters and histograms keep their
    files, and so their counts."""
    if not enabled():
        return
    from prometheus_client import multiprocess, values

    multiprocess.mark_process_dead(os.getpid())
    values.ValueClass = values.get_value_class()  # fresh files for the metrics built next
    job_metrics.cache_clear()


def record_outcome(outcome: str, seconds: float) -> None:
    metrics = job_metrics()
    if metrics is not None:
        try:
            metrics.record_outcome(outcome, seconds)
        except Exception:  # noqa: BLE001 - a metric must never change what a job did
            log.exception("could not record the job's outcome metric")


class StepRate:
    """Steps per second over the last `window_s`, from (time, step) samples. Measured
    from the first step on: the set-up before it (data, model) is not training speed."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()
        self._moved = False

    def add(self, now: float, step: int) -> float | None:
        if not self._moved:
            if self._samples and step != self._samples[0][1]:
                self._moved = True
            else:  # still setting up: the window starts at the latest sample
                self._samples.clear()
        self._samples.append((now, step))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return None
        return max(0, s1 - s0) / (t1 - t0)


class RunningJobGauges:
    """While a job runs (a `with` block around it): its steps/s and the GPU memory of
    this process, sampled from a thread every `interval_s`. A no-op when this worker
    serves no metrics."""

    def __init__(self, job_id: str, current_step: Callable[[], int], interval_s: float = SAMPLE_INTERVAL_S,
                 metrics: JobMetrics | None = None) -> None:  # fmt: skip
        self.job_id = job_id
        self.current_step = current_step
        self.interval_s = interval_s
        self.metrics = metrics if metrics is not None else job_metrics()
        self.rate = StepRate()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-gauges", daemon=True)

    def sample(self) -> None:
        assert self.metrics is not None
        steps_per_second = self.rate.add(time.monotonic(), self.current_step())
        if steps_per_second is not None:
            self.metrics.steps_per_second.labels(self.job_id).set(steps_per_second)
        self.metrics.record_gpu_memory()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a metric must never end a job
                log.exception("could not sample the job's gauges")
                return

    def __enter__(self) -> RunningJobGauges:
        if self.metrics is not None:
            self.rate.add(time.monotonic(), self.current_step())
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.metrics is None:
            return
        self._stop.set()
        self._thread.join()
        # The job is over: its live series go.
        if enabled():
            drop_live_gauges()
        else:  # an in-memory registry
            self.metrics.steps_per_second.remove(self.job_id)


# ---------------------------------------------------------------- the worker's main process


def prepare_directory() -> Path:
    """Set PROMETHEUS_MULTIPROC_DIR for this process and the children it will fork, and
    empty it (files of an earlier run would be summed in). An operator's own directory
    is used if set; it must not be shared with another worker."""
    path = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="descent-worker-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(path)
    if "prometheus_client" in sys.modules:  # imported before the directory was set: pick the file store now
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FinishedChildrenDropped:
    """MultiProcessCollector that first drops the live gauges of children that are gone
    (killed ones never called mark_process_dead themselves)."""

    def __init__(self, path: Path) -> None:
        from prometheus_client import multiprocess

        self.path = path
        self._multiprocess = multiprocess
        self._collector = multiprocess.MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterator[Any]:
        for name in glob.glob(os.path.join(self.path, "gauge_live*_*.db")):
            pid = Path(name).stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                self._multiprocess.mark_process_dead(int(pid), str(self.path))
        return self._collector.collect()


def start_exporter(port: int, host: str) -> Any:
    """In the worker's main process, before it forks: serve /metrics on host:port.
    Returns the HTTP server, or None when it could not start (the worker runs on)."""
    path = prepare_directory()
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(FinishedChildrenDropped(path))  # type: ignore[arg-type]
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%d (%s); this worker serves no /metrics", host, port, exc)
        return None
    log.info("worker metrics on http://%s:%d/metrics (files in %s)", host, port, path)
    return server


def mark_child_dead(pid: int) -> None:
    """A child is exiting: its live gauges go now, not at the next scrape."""
    if enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def remove_directory() -> None:
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).name.startswith("descent-worker-metrics-"):
        shutil.rmtree(path, ignore_errors=True)
