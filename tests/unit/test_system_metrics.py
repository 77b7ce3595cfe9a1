"""System metrics in a job's MLflow run: mlflow's monitors, sampled on our loop, sent
to a real (SQLite-backed) MLflow store; an unreachable MLflow costs samples, never
the job's time."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from worker.system_metrics import STOP_WAIT_S, JobSystemMetrics, SampleDestination, SystemMetricsSampler


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db")


def test_samples_land_in_the_run_under_mlflows_system_names_at_the_training_step(mlflow_store: MlflowClient) -> None:
    run_id = mlflow_store.create_run(mlflow_store.create_experiment("system-metrics")).info.run_id
    step = {"value": 7}
    with JobSystemMetrics(mlflow_store, lambda: run_id, lambda: step["value"], interval_s=0.2) as system:
        time.sleep(0.5)
        step["value"] = 40
    assert system.sent >= 2 and system.missed == 0
    metrics = mlflow_store.get_run(run_id).data.metrics
    for name in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                 "system/system_memory_usage_percentage"):  # fmt: skip
        assert name in metrics
    history = mlflow_store.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert history[0].step == 7 and history[-1].step == 40  # the last sample is taken as it stops
    assert all(point.value > 0 for point in history)


def test_before_the_run_exists_samples_are_missed_then_sent(mlflow_store: MlflowClient) -> None:
    run = {"id": None}
    with JobSystemMetrics(mlflow_store, lambda: run["id"], lambda: 0, interval_s=0.1) as system:
        time.sleep(0.35)
        run["id"] = mlflow_store.create_run(mlflow_store.create_experiment("late-run")).info.run_id
        time.sleep(0.35)
    assert system.missed >= 2 and system.sent >= 2
    assert "system/cpu_utilization_percentage" in mlflow_store.get_run(run["id"]).data.metrics


def test_no_samples_while_the_attempt_may_not_send(mlflow_store: MlflowClient) -> None:
    run_id = mlflow_store.create_run(mlflow_store.create_experiment("lease-lost")).info.run_id
    with JobSystemMetrics(mlflow_store, lambda: run_id, lambda: 0, interval_s=0.1, may_send=lambda: False) as system:
        time.sleep(0.3)
    assert system.sent == 0 and not mlflow_store.get_run(run_id).data.metrics


def test_mlflow_down_costs_samples_not_time(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with JobSystemMetrics(down, lambda: "0" * 32, lambda: 0, interval_s=0.1) as system:
        time.sleep(0.5)
    stop_took = time.monotonic() - started - 0.5
    assert system.sent == 0 and system.missed >= 3  # every sample tried, none sent, the loop kept going
    assert stop_took < STOP_WAIT_S + 0.5


def test_a_packs_sample_goes_to_every_trial_still_in_the_pack_at_its_own_step(mlflow_store: MlflowClient) -> None:
    experiment = mlflow_store.create_experiment("pack")
    runs = [mlflow_store.create_run(experiment).info.run_id for _ in range(3)]
    still_in = [True, True, True]
    destinations = [
        SampleDestination(lambda k=k: runs[k], lambda k=k: 10 * (k + 1), may_send=lambda k=k: still_in[k])
        for k in range(3)
    ]
    cpu = "system/cpu_utilization_percentage"

    def samples(k: int, at_least: int) -> int:  # (a loaded machine samples late: wait for them)
        deadline = time.monotonic() + 10
        while len(history := mlflow_store.get_metric_history(runs[k], cpu)) < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(history)

    with SystemMetricsSampler(mlflow_store, destinations, interval_s=0.1) as system:
        assert samples(1, at_least=2) >= 2
        still_in[1] = False  # this trial left the pack (pruned): its run takes no more samples
        taken_by_the_pruned = samples(1, at_least=0)
        assert samples(0, at_least=taken_by_the_pruned + 3) >= taken_by_the_pruned + 3
    assert system.sent >= 1 and system.missed >= 1  # every destination took the first ones; later, one did not
    for k in (0, 2):
        history = mlflow_store.get_metric_history(runs[k], cpu)
        assert len(history) >= taken_by_the_pruned + 3 and {p.step for p in history} == {10 * (k + 1)}
    history = mlflow_store.get_metric_history(runs[1], cpu)
    assert len(history) <= taken_by_the_pruned + 1 and {p.step for p in history} == {20}  # (+1: one in flight)
