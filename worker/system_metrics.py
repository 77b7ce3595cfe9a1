"""CPU, memory, disk, network and (with pynvml) GPU samples in the job's MLflow run,
as `system/...` metrics, every `system_metrics_interval_s`.

mlflow's SystemMetricsMonitor measures (its CPU, GPU, disk and network monitors and
their names, so the runs look like any other MLflow run's system metrics); only its
loop and its transport are replaced, because the stock ones would break the house rules:
its thread asks MLflow for the run before every sample and stops for good at the first
failure (an MLflow blip would end a job's system metrics), and `finish()` waits
for MLflow's retries (minutes while MLflow is down, at the end of every job). A job's
samples go into its metric sink's buffer (`SampleDestination.buffer`) and to MLflow with
its next batch of points: no request of their own (a short job's last sample was one more
request, waited for before the job's end), held with the points while MLflow is down or
the lease is stale. A destination without a sink (tools, tests) is sent each sample with
one request and no retry (the metric sink's writer); a sample MLflow does not take is
missed, the next one is tried as usual; stopping waits at most `STOP_WAIT_S`. Samples are
logged at the job's training step, so they line up with the loss curve, and they are
taken only while the attempt holds the job's lease. A pack (worker/execute_pack.py)
trains its trials in one process: one sampler gives each sample to every trial still in
the pack.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from jobs.settings import settings
from worker.metrics_sink import MetricPoint, MlflowMetricSink, client_batch_writer, rest_batch_writer
from worker.monitor import JobMonitor, JobReporter, StopReason

log = logging.getLogger(__name__)

STOP_WAIT_S = 2.0  # the last sample's request may take this long at the end of a job


@dataclass(frozen=True)
class SampleDestination:
    """A run that takes the samples: its id (None until the sink opens it), the training step
    to log them at, whether it may take one now, and how to wait for it to open; or, with
    `buffer`, the job's metric sink that takes them and sends them with its points."""

    run_id: Callable[[], str | None]
    step: Callable[[], int]
    may_send: Callable[[], bool] = lambda: True
    open_run: Callable[[], bool] = lambda: True
    buffer: Callable[[list[MetricPoint]], None] | None = None


class SystemMetricsSampler(SystemMetricsMonitor):
    """Samples the machine every `interval_s` and sends each sample to every destination."""

    def __init__(self, client: MlflowClient, destinations: list[SampleDestination], interval_s: float) -> None:
        super().__init__(run_id=None, sampling_interval=interval_s, tracking_uri=client.tracking_uri)
        uri = client.tracking_uri
        self._write = rest_batch_writer(uri) if uri.startswith(("http://", "https://")) else client_batch_writer(client)
        self.destinations = destinations
        self.sent = 0  # samples every destination took
        self.missed = 0  # samples some destination missed (MLflow unreachable, its run not yet open)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def sample_and_send(self) -> bool:
        """One sample to every destination; False when one of them missed it."""
        self.collect_metrics()
        aggregated = self.aggregate_metrics()
        for monitor in self.monitors:
            monitor.clear_metrics()
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        timestamp, missed = int(time.time() * 1000), False
        for destination in self.destinations:
            run_id = destination.run_id()
            if (run_id is None and destination.buffer is None) or not destination.may_send():
                missed = True
                continue
            step = destination.step()
            points: list[MetricPoint] = [(prefix + key, float(value), timestamp, step) for key, value in aggregated.items()]
            if destination.buffer is not None:  # with the sink's next points (it opens the run)
                destination.buffer(points)
                continue
            try:
                self._write(run_id, points)
            except Exception as exc:  # noqa: BLE001 - a missed sample; the job goes on
                missed = True
                log.warning("system metrics: a sample was missed (%s)", exc)
        if missed:
            self.missed += 1
        else:
            self.sent += 1
        return not missed

    def _loop(self) -> None:
        psutil.cpu_percent()  # its first reading is meaningless: this starts its clock
        while not self._stop.wait(self.sampling_interval):
            self._sample_safely()
        # The last stretch, so that a short job has a sample too: such a job may end before
        # the sink has opened its run (it does so from its own thread), so a destination sent
        # to directly waits for that (a sink's buffer takes the sample whether or not it has).
        for destination in self.destinations:
            if destination.buffer is None and destination.run_id() is None and destination.may_send():
                destination.open_run()
        self._sample_safely()

    def _sample_safely(self) -> None:
        try:
            self.sample_and_send()
        except Exception:  # noqa: BLE001 - never let sampling end a job
            log.exception("system metrics: sampling failed")

    # SystemMetricsMonitor's own start/finish, on this loop.
    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        """Stop, and wait for the last sample (into the sinks' buffers: at once; sent: at most STOP_WAIT_S)."""
        self.stop()
        self.wait()

    def stop(self) -> None:
        """Stop sampling; the thread takes its last sample and sends it meanwhile."""
        self._stop.set()

    def wait(self) -> None:
        """Until the last sample is sent (at most STOP_WAIT_S)."""
        self._thread.join(STOP_WAIT_S)
        if self._thread.is_alive():
            log.warning("system metrics: the last sample did not reach MLflow within %.0f s", STOP_WAIT_S)

    def __enter__(self) -> SystemMetricsSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class JobSystemMetrics(SystemMetricsSampler):
    """One job's samples, into its run."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: Callable[[], str | None],
        current_step: Callable[[], int],
        interval_s: float,
        may_send: Callable[[], bool] = lambda: True,
        open_run: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(client, [SampleDestination(run_id, current_step, may_send, open_run)], interval_s)


def run_destination(
    sink: MlflowMetricSink, reporter: JobReporter, monitor: JobMonitor, still_in: Callable[[], bool] = lambda: True
) -> SampleDestination:
    """A job's run (or a packed trial's), through its sink's buffer, while this attempt holds the
    job (and, for a trial, while it is still in its pack)."""
    return SampleDestination(
        lambda: sink.run_id, lambda: reporter.step,
        may_send=lambda: still_in() and monitor.lease_is_fresh() and reporter.stop_reason != StopReason.lease_lost,
        buffer=sink.add_points,  # (the sink opens the run itself: nothing to wait for)
    )  # fmt: skip


def job_system_metrics(
    client: MlflowClient, sink: MlflowMetricSink, reporter: JobReporter, monitor: JobMonitor
) -> SystemMetricsSampler | None:
    """A running job's samples (not started). None when the settings turn them off."""
    if not settings.system_metrics_interval_s:
        return None
    return SystemMetricsSampler(client, [run_destination(sink, reporter, monitor)], settings.system_metrics_interval_s)


def pack_system_metrics(client: MlflowClient, destinations: list[SampleDestination]) -> SystemMetricsSampler | None:
    """A pack's samples (not started): one process trains every trial, so one sample goes to
    each trial's run. None when the settings turn them off."""
    if not settings.system_metrics_interval_s:
        return None
    return SystemMetricsSampler(client, destinations, settings.system_metrics_interval_s)
