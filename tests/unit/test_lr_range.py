"""The learning-rate range test: the trainer stops (without failing) once the loss
explodes, and the reading suggests a learning rate before the loss's minimum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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


def sigmoid_drop(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """A symmetric fall of 2 nats, steepest at `centre` (in log10 lr)."""
    return 2.3 - 2.0 / (1 + np.exp(-(x - centre) / width))


def gompertz_drop(x: np.ndarray, centre: float, width: float) -> np.ndarray:
    """An asymmetric fall (slow start, abrupt end), steepest at `centre`: d/dt exp(-e^t) peaks at t = 0."""
    return 0.3 + 2.0 * np.exp(-(10 ** ((x - centre) / width)))


SYNTHETIC = [  # (shape, centre, width, explosion's steepness): the wall starts 1.5 decades past the centre
    (sigmoid_drop, -4.0, 0.3, 20.0),
    (sigmoid_drop, -3.0, 0.4, 2.0),
    (sigmoid_drop, -3.0, 0.2, 200.0),
    (sigmoid_drop, -2.0, 0.5, 20.0),
    (gompertz_drop, -3.0, 1.0, 20.0),
    (gompertz_drop, -4.0, 0.5, 5.0),
]


def synthetic_run(shape, centre: float, width: float, wall: float, steps: int, noise: float, seed: int = 0):  # noqa: ANN001, ANN201
    """A range test from 1e-6 to 10 over `steps` steps (the study's defaults) on a known curve:
    (lrs, losses, the true steepest point, the true lowest point), both in log10 lr."""
    curve = lambda x: shape(x, centre, width) + wall * np.maximum(0.0, x - centre - 1.5) ** 2  # noqa: E731
    fine = np.linspace(-6, 1, 700_001)
    lowest = int(np.argmin(curve(fine)))
    steepest = int(np.argmin(np.gradient(curve(fine), fine)[: lowest + 1]))
    x = np.linspace(-6, 1, steps)
    losses = curve(x) * (1 + noise * np.random.default_rng(seed).standard_normal(steps))
    return list(10**x), list(losses), fine[steepest], fine[lowest]


@pytest.mark.parametrize("steps", [100, 300, 1000, 3000])
def test_the_suggestion_is_not_late(steps: int) -> None:
    """fastai's moving average (beta 0.98) trails by ~49 steps: it read these curves 0.5 decade
    late at 100 steps and 0.1 at 3,000. The centred fit must be within 0.1 decade at any length,
    and so must the lowest-loss bound where the curve has a well-defined bottom."""
    for shape, centre, width, wall in SYNTHETIC:
        lrs, losses, steepest, lowest = synthetic_run(shape, centre, width, wall, steps, noise=0.0)
        reading = analyse(lrs, losses)
        assert abs(math.log10(reading["suggested_lr"]) - steepest) < 0.1, (shape.__name__, centre, width)
        if shape is sigmoid_drop:  # the Gompertz curves are flat (to 1e-10) a decade before the wall
            assert abs(math.log10(reading["min_loss_lr"]) - lowest) < 0.1, (shape.__name__, centre, width)


@pytest.mark.parametrize("steps", [1000, 3000])
def test_the_suggestion_holds_on_noisy_curves(steps: int) -> None:
    """5% multiplicative noise per step: the old reading's argmin of a noisy slope strayed by up to 2.7 decades."""
    for seed in range(3):
        for shape, centre, width, wall in SYNTHETIC:
            lrs, losses, steepest, _ = synthetic_run(shape, centre, width, wall, steps, noise=0.05, seed=seed)
            assert abs(math.log10(analyse(lrs, losses)["suggested_lr"]) - steepest) < 0.1, (shape.__name__, seed)


def digits_range_test() -> JobSpec:
    """issue 15's case: a digits MLP, sgd, lr 1e-4 -> 50; the loss explodes mid-epoch."""
    return JobSpec.model_validate({
        "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [32]}, "epochs": 8, "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 50.0}, "schedule": {"name": "lr_range", "min_lr": 1e-4}, "seed": 0,
    })  # fmt: skip


def range_run(every: int | None, resume: bytes | None = None):  # noqa: ANN201
    from tests.unit.test_resume import CheckpointingReporter, run

    reporter = CheckpointingReporter()
    trainer, result = run(digits_range_test(), every=every, reporter=reporter, resume=resume)
    return trainer, result, reporter


def test_the_explosion_is_the_same_step_whatever_the_checkpoint_cadence_and_after_a_resume() -> None:
    straight, result, reporter = range_run(None)
    assert result.exploded_at_step is not None and result.exploded_at_lr is not None
    assert result.steps == result.exploded_at_step + 1  # stopped on the exploding step, not at the window's end
    assert result.exploded_at_lr == reporter.history["lr"][-1][1]  # the exploding step is logged, and last
    assert reporter.history["exploded_at_step"] == [(result.exploded_at_step, result.exploded_at_step)]
    expected = {k: v.clone() for k, v in straight.model.state_dict().items()}
    # Every 3: a checkpoint falls after the exploding step and before the window's end.
    runs = {"every 10": range_run(10), "every 25": range_run(25), "every 3": range_run(3)}
    _, _, every_10 = runs["every 10"]
    before = max(s for s in every_10.checkpoints if s < result.exploded_at_step)  # the last checkpoint before it
    runs["resumed"] = range_run(10, resume=every_10.checkpoints[before])
    after = min(s for s in runs["every 3"][2].checkpoints if s > result.exploded_at_step + 1)
    assert after < straight.position.step  # (the loop trained on to its window's end: see _reported_step)
    runs["resumed after it"] = range_run(3, resume=runs["every 3"][2].checkpoints[after])
    starts = {"resumed": before, "resumed after it": after}
    for name, (trainer, other, other_reporter) in runs.items():
        assert (other.steps, other.exploded_at_step, other.exploded_at_lr, other.stopped_by) == (
            result.steps, result.exploded_at_step, result.exploded_at_lr, result.stopped_by), name  # fmt: skip
        assert other.final_metrics == result.final_metrics, name
        for key, tensor in trainer.model.state_dict().items():
            assert torch.equal(tensor, expected[key]), (name, key)
        start = starts.get(name, 0)
        for key in ("train_loss", "lr", "exploded_at_lr"):
            expected_rows = [(s, v) for s, v in reporter.history[key] if s >= start]
            assert other_reporter.history.get(key, []) == expected_rows, (name, key)


def test_the_analysis_reports_where_the_loss_exploded() -> None:
    spec = digits_range_test()
    reporter = RecordingReporter()
    result = run_training(spec, reporter)
    lrs = [v for _, v in reporter.history["lr"]]
    losses = [v for _, v in reporter.history["train_loss"]]
    reading = analyse(lrs, losses, spec.schedule.stop_factor)
    assert reading["exploded_at_step"] == result.exploded_at_step
    assert reading["exploded_at_lr"] == result.exploded_at_lr


def test_the_trainers_record_of_the_explosion_is_taken_when_its_loss_was_not_logged() -> None:
    # A loss that went straight to NaN is not logged (MLflow's JSON has no NaN): the
    # trainer's exploded_at_step/exploded_at_lr metrics say where it was.
    lrs, losses, *_ = synthetic_run(sigmoid_drop, -3.0, 0.4, 2.0, 300, noise=0.0)
    steps = list(range(10, 310))  # (a run whose logged steps do not start at 0)
    cut = 200
    reading = analyse(lrs[:cut], losses[:cut], 4.0, steps[:cut], exploded_at=(steps[cut], lrs[cut]))
    assert (reading["exploded_at_step"], reading["exploded_at_lr"]) == (steps[cut], lrs[cut])
    assert reading["suggested_lr"] is not None
    own = analyse(lrs, losses, 4.0, steps)  # without the record: the rule over the logged losses
    assert own["exploded_at_step"] is not None and own["exploded_at_lr"] == lrs[own["exploded_at_step"] - 10]
