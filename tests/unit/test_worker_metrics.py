"""The worker's Prometheus metrics: what a job records, and the multiprocess path as a
worker runs it (a child process records, the parent's collector serves the union, the
live gauges of a child that is gone are dropped)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.prometheus_metrics import JobMetrics, RunningJobGauges, StepRate

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_job_records_its_outcome_and_its_duration_by_outcome() -> None:
    registry = CollectorRegistry()
    metrics = JobMetrics(registry)
    metrics.record_outcome("succeeded", 42.0)
    metrics.record_outcome("succeeded", 3.0)
    metrics.record_outcome("failed", 7.0)
    metrics.record_outcome("skipped", 0.01)  # a duplicate delivery: counted, nothing ran
    got = samples(generate_latest(registry).decode())
    assert got[("descent_worker_jobs_total", (("outcome", "succeeded"),))] == 2
    assert got[("descent_worker_jobs_total", (("outcome", "skipped"),))] == 1
    assert got[("descent_worker_job_duration_seconds_count", (("outcome", "succeeded"),))] == 2
    assert got[("descent_worker_job_duration_seconds_sum", (("outcome", "succeeded"),))] == 45.0
    assert got[("descent_worker_job_duration_seconds_bucket", (("le", "5.0"), ("outcome", "succeeded")))] == 1
    assert got[("descent_worker_job_duration_seconds_sum", (("outcome", "failed"),))] == 7.0
    assert ("descent_worker_job_duration_seconds_count", (("outcome", "skipped"),)) not in got


def test_steps_per_second_is_measured_over_the_recent_window() -> None:
    rate = StepRate(window_s=10.0)
    assert rate.add(0.0, 100) is None  # one sample: no rate yet
    assert rate.add(5.0, 100) is None  # setting up (or resuming at step 100): not a rate of 0
    assert rate.add(6.0, 150) == 50.0  # from the last sample before the first step
    for t in range(2, 30):
        rate.add(float(t), 150 + (t - 1) * 20)  # slows down to 20 steps/s
    assert rate.add(30.0, 150 + 29 * 20) == 20.0  # the fast start has left the window
    for t in range(31, 45):
        last = rate.add(float(t), 150 + 29 * 20)  # stalled
    assert last == 0.0  # a stalled job reads 0, not its last pace


def test_the_running_jobs_gauges_follow_its_steps_and_read_no_gpu_without_cuda() -> None:
    import torch

    registry = CollectorRegistry()
    metrics = JobMetrics(registry)
    step = {"value": 0}
    with RunningJobGauges("job-1", lambda: step["value"], interval_s=3600, metrics=metrics) as gauges:
        step["value"] = 500
        gauges.sample()
        during = samples(generate_latest(registry).decode())
    after = samples(generate_latest(registry).decode())
    assert during[("descent_worker_job_steps_per_second", (("job_id", "job-1"),))] > 0
    assert ("descent_worker_job_steps_per_second", (("job_id", "job-1"),)) not in after  # the job is over
    assert not any(name.startswith("descent_worker_gpu") for name, _ in during)
    assert not torch.cuda.is_initialized()  # reading GPU memory never initialises CUDA


CHILD = textwrap.dedent(
    """
    import sys, time
    from worker.prometheus_metrics import RunningJobGauges, record_outcome
    step = {"value": 0}
    with RunningJobGauges(sys.argv[1], lambda: step["value"], interval_s=0.05):
        for i in range(10):
            step["value"] += 100
            time.sleep(0.03)
        print("RUNNING", flush=True)
        if sys.argv[2] == "hold":  # a job still running, until the test kills its process
            time.sleep(600)
    record_outcome("succeeded", 12.5)
    """
)


def test_children_record_and_the_main_process_serves_their_union(tmp_path: Path) -> None:
    """As a worker runs it: the parent prepares the directory and serves /metrics,
    children (other processes) record; a finished child's counts stay, a running
    child's steps/s shows, and goes once that child is killed."""
    code = textwrap.dedent(
        f"""
        import os, signal, subprocess, sys, httpx
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path / "prom")!r}
        from worker import prometheus_metrics as pm
        server = pm.start_exporter({free_port()}, "127.0.0.1")
        url = "http://127.0.0.1:%d/metrics" % server.server_port
        child = [sys.executable, "-c", {CHILD!r}]
        subprocess.run(child + ["job-a", "finish"], check=True, stdout=subprocess.DEVNULL)
        held = subprocess.Popen(child + ["job-b", "hold"], stdout=subprocess.PIPE, text=True)
        assert held.stdout.readline().startswith("RUNNING")
        print("RUNNING", httpx.get(url).text.replace("\\n", "|"))
        held.send_signal(signal.SIGKILL)
        held.wait()
        print("KILLED", httpx.get(url).text.replace("\\n", "|"))
        print("TORCH", "torch" in sys.modules)
        """
    )
    (tmp_path / "prom").mkdir()
    (tmp_path / "prom" / "counter_1.db").write_bytes(b"stale")  # an earlier run's file: wiped at start
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr

    def scrape(tag: str) -> dict:
        line = next(line for line in out.stdout.splitlines() if line.startswith(tag + " "))
        return samples(line.removeprefix(tag + " ").replace("|", "\n"))

    running, killed = scrape("RUNNING"), scrape("KILLED")
    job_b = ("descent_worker_job_steps_per_second", (("job_id", "job-b"),))
    assert running[job_b] > 0  # the running job's steps/s, from its own process
    assert job_b not in killed  # killed: no stale rate
    for got in (running, killed):  # the finished job's counts stay
        assert got[("descent_worker_jobs_total", (("outcome", "succeeded"),))] == 1
        assert got[("descent_worker_job_duration_seconds_sum", (("outcome", "succeeded"),))] == 12.5
    assert "TORCH False" in out.stdout  # the serving process never imported torch


def test_the_port_is_a_setting_off_by_default() -> None:
    from jobs.settings import Settings

    assert Settings().worker_metrics_port == 0
    assert Settings(worker_metrics_port=9101).worker_metrics_port == 9101
    assert Settings().system_metrics_interval_s == 10.0


def test_a_port_already_taken_leaves_the_worker_without_metrics_not_dead(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import os, socket
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from worker import prometheus_metrics as pm
        first = pm.start_exporter(0, "127.0.0.1")
        print("SECOND", pm.start_exporter(first.server_port, "127.0.0.1"))
        """
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "SECOND None" in out.stdout and "cannot listen" in out.stderr
