"""The learning-rate range test: the trainer stops (without failing) once the loss
explodes, and the reading suggests a learning rate before the loss's minimum."""

from __future__ import annotations

import math

import numpy as np

from jobs.lr_range import LossExplosionWatch, analyse
from jobs.spec import JobSpec
from trainer.recipe import run_training
from trainer.reporting import RecordingReporter


def test_a_range_test_run_stops_when_the_loss_explodes_and_does_not_fail() -> None:
    spec = JobSpec.model_validate({
        "dataset": {"name": "iris"}, "model": {"arch": "mlp", "hidden": [16]}, "epochs": 120, "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 1000.0}, "schedule": {"name": "lr_range", "min_lr": 1e-4},
    })  # fmt: skip
    reporter = RecordingReporter()
    result = run_training(spec, reporter)
    assert result.stopped_by is not None and "loss exploded" in result.stopped_by
    assert not result.stopped_early and result.steps < spec.total_steps
    lrs = [v for _, v in reporter.history["lr"]]
    assert lrs[0] == 1e-4 and all(b > a for a, b in zip(lrs, lrs[1:]))  # exponential ramp, every step logged
    assert all(math.isfinite(v) for _, v in reporter.history["train_loss"])  # logged up to the explosion only


def test_the_watch_smooths_before_it_calls_an_explosion() -> None:
    watch = LossExplosionWatch(4.0)
    assert not any(watch.exploded(v) for v in [1.0, 0.9, 0.8, 5.0, 0.7])  # one spike is smoothed away
    assert any(watch.exploded(v) for v in [50.0] * 20)
    assert LossExplosionWatch(4.0).exploded(float("nan"))


def test_the_reading_suggests_the_steepest_descent_before_the_minimum() -> None:
    lrs = list(np.logspace(-5, 1, 300))
    # a loss that falls fastest around lr 1e-3, bottoms out near 1e-1 and then explodes
    losses = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 1) ** 2 * 20
              for lr in lrs]  # fmt: skip
    reading = analyse(lrs, losses)
    assert 3e-4 < reading["suggested_lr"] < 3e-3
    assert 1e-2 < reading["min_loss_lr"] <= 2e-1
    assert reading["bounds"] == [reading["suggested_lr"] / 10, reading["min_loss_lr"]]
    assert reading["exploded_at_lr"] is not None


def test_too_few_points_say_so() -> None:
    reading = analyse([1e-3, 1e-2], [1.0, float("nan")])
    assert reading["suggested_lr"] is None and "fewer than 5" in reading["reason"]
