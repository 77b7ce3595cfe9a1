"""The per-job metrics rule through the real stack: a worker whose METRICS_MAX_POINTS_PER_S
a fast digits job exceeds logs it in windows, says so in the run's tag, and loses no step;
the session's stack (the default limit and burst) keeps a test-sized job at every step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.conftest import ADMIN_KEY, Stack, running_stack, stack_settings
from tests.integration.test_job_lifecycle import DIGITS_ADAM
from worker.metrics_rule import EVERY_STEP, RULE_TAG, WINDOW_METRIC, point_steps

LIMIT = 10.0  # points/s: a digits job makes tens to hundreds of steps a second here, 3 points each


@pytest.fixture(scope="module")
def slow_mlflow_stack(make_database, tmp_path_factory) -> Iterator[Stack]:  # noqa: ANN001
    home = tmp_path_factory.mktemp("metrics-rule-home")
    settings = stack_settings(make_database, home, "descent_rule", bootstrap_key=ADMIN_KEY,
                              metrics_max_points_per_s=LIMIT, metrics_burst_s=2.0)  # fmt: skip
    with running_stack(settings, home, workers=1, concurrency=1) as (group, api):
        yield Stack(settings, group, api, MlflowClient(settings.mlflow_tracking_uri), None)


def test_a_fast_job_above_the_limit_logs_windows_says_so_and_loses_no_step(slow_mlflow_stack: Stack) -> None:
    stack = slow_mlflow_stack
    job = stack.wait(stack.submit(DIGITS_ADAM | {"name": "it-metrics-windows", "epochs": 40})["id"], timeout_s=300)
    assert job["status"] == "succeeded", job["error"]
    total = job["progress"]["total_steps"]
    run_id = job["mlflow"]["run_id"]
    tag = stack.mlflow.get_run(run_id).data.tags[RULE_TAG]
    assert tag.startswith(f"mean of N-step windows above {LIMIT:g} points/s"), tag

    changes = sorted((m.step, int(m.value)) for m in stack.mlflow.get_metric_history(run_id, WINDOW_METRIC))
    assert changes and changes[0][1] > 1, changes  # it began with every step, then windows
    expected, windowed = point_steps(changes, total)
    metrics = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    for key in ("train_loss", "lr", "grad_norm"):
        assert [p["step"] for p in metrics[key]] == expected, key
    # Fewer points than steps. How many fewer follows the job's measured step rate, which a
    # loaded machine moves (a stretch slower than the limit goes back to every step: in CI,
    # once, 369 points for 920 steps), so the bound itself is bench/metrics_rate.py's to show.
    assert len(expected) < total, (len(expected), total, changes)
    assert [p["step"] for p in metrics["train_loss_window_min"]] == windowed
    assert [p["step"] for p in metrics["grad_norm_window_max"]] == windowed
    mean = {p["step"]: p["value"] for p in metrics["train_loss"]}
    for low, high in zip(metrics["train_loss_window_min"], metrics["train_loss_window_max"]):
        assert low["value"] <= mean[low["step"]] + 1e-9 and mean[low["step"]] <= high["value"] + 1e-9
    assert len(metrics["val_accuracy"]) == 40  # epoch metrics are not per-step rows: all of them
    assert job["metrics"]["val_accuracy"] == pytest.approx(metrics["val_accuracy"][-1]["value"])


def test_a_test_sized_job_under_the_default_burst_logs_every_step(stack: Stack) -> None:
    job = stack.wait(stack.submit(DIGITS_ADAM | {"name": "it-metrics-every-step", "epochs": 20})["id"])
    assert job["status"] == "succeeded", job["error"]
    run = stack.mlflow.get_run(job["mlflow"]["run_id"])
    assert run.data.tags[RULE_TAG] == EVERY_STEP
    assert WINDOW_METRIC not in run.data.metrics
    metrics = stack.api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [p["step"] for p in metrics["train_loss"]] == list(range(job["progress"]["total_steps"]))
