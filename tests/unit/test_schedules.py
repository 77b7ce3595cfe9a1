"""Each schedule, stepped as the trainer steps it, follows the closed form of trainer/schedules.py.

The closed forms are written out here, independently of the implementation:
step s (0-based) trains with lr(s); T is the run's total steps, W the warm-up.
"""

from __future__ import annotations

import math

import pytest
import torch

from jobs.spec import (
    SCHEDULES,
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    InverseSqrtSchedule,
    LRRangeSchedule,
    JobSpec,
    StepSchedule,
    WarmupCosineSchedule,
    WarmupLinearSchedule,
)
from trainer.schedules import build_schedule

LR = 0.1
T = 50
W = 10


def closed_form(spec, lr: float, total: int):  # noqa: ANN001, ANN201
    """lr(s) from the docstring's formulas."""
    name = spec.name
    if name == "constant":
        return lambda s: lr
    if name == "step":
        return lambda s: lr * spec.gamma ** (s // spec.step_size)
    if name == "exponential":
        return lambda s: lr * spec.gamma**s
    if name == "cosine":
        return lambda s: spec.min_lr + (lr - spec.min_lr) * (1 + math.cos(math.pi * s / (total - 1))) / 2
    if name == "inverse_sqrt":
        w = spec.warmup_steps
        return lambda s: lr * min((s + 1) / w, math.sqrt(w / (s + 1)))
    if name in ("warmup_linear", "warmup_cosine"):
        w, floor = spec.warmup_steps, spec.min_lr

        def lr_at(s: int) -> float:
            if s < w:
                return lr * (s + 1) / w
            p = (s - w + 1) / (total - w)  # 0 at the warm-up's peak (s = W - 1), 1 at the last step
            if name == "warmup_linear":
                return lr + (floor - lr) * p
            return floor + (lr - floor) * (1 + math.cos(math.pi * p)) / 2

        return lr_at
    if name == "lr_range":
        return lambda s: spec.min_lr * (lr / spec.min_lr) ** (s / (total - 1))
    raise AssertionError(f"no closed form written for {name}")


def lrs_used(spec, lr: float, total: int) -> list[float]:  # noqa: ANN001
    """The lr each of `total` steps trains with, stepping optimizer then schedule like the trainer."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    schedule = build_schedule(optimizer, spec, total)
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(1)
        optimizer.step()
        schedule.step()
    return used


def close(actual: float, expected: float) -> bool:
    # rel 1e-6; the tiny absolute slack only matters where the expected value is exactly 0
    return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-15)


SPECS = [
    ConstantSchedule(name="constant"),
    StepSchedule(name="step", step_size=7, gamma=0.5),
    ExponentialSchedule(name="exponential", gamma=0.9),
    CosineSchedule(name="cosine", min_lr=0.0),
    CosineSchedule(name="cosine", min_lr=0.002),
    WarmupLinearSchedule(name="warmup_linear", warmup_steps=W, min_lr=0.0),
    WarmupLinearSchedule(name="warmup_linear", warmup_steps=W, min_lr=0.005),
    WarmupCosineSchedule(name="warmup_cosine", warmup_steps=W, min_lr=0.0),
    WarmupCosineSchedule(name="warmup_cosine", warmup_steps=W, min_lr=0.005),
    InverseSqrtSchedule(name="inverse_sqrt", warmup_steps=W),
    LRRangeSchedule(name="lr_range", min_lr=1e-5),
]


def test_every_registered_schedule_is_covered() -> None:
    assert {s.name for s in SPECS} == set(SCHEDULES)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_schedule_matches_closed_form_at_chosen_steps(spec) -> None:  # noqa: ANN001
    used = lrs_used(spec, LR, T)
    expected = closed_form(spec, LR, T)
    for s in (0, 1, W - 1, W, W + 1, T // 2, T - 2, T - 1):
        assert close(used[s], expected(s)), f"step {s}: {used[s]} != {expected(s)}"


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_schedule_matches_closed_form_at_every_step(spec) -> None:  # noqa: ANN001
    used = lrs_used(spec, LR, T)
    expected = closed_form(spec, LR, T)
    mismatches = [(s, used[s], expected(s)) for s in range(T) if not close(used[s], expected(s))]
    assert not mismatches


def test_hand_computed_values() -> None:
    """A few values worked out by hand, so the closed forms above are checked too."""
    warm = lrs_used(WarmupCosineSchedule(name="warmup_cosine", warmup_steps=4, min_lr=0.0), 1.0, 9)
    # warm-up 1/4, 2/4, 3/4, 1 (the peak, s = 3); then cosine over s = 4..8: p = 1/5, 2/5, 3/5, 4/5, 1
    expected = [0.25, 0.5, 0.75, 1.0] + [(1 + math.cos(math.pi * k / 5)) / 2 for k in range(1, 6)]
    assert all(close(a, b) for a, b in zip(warm, expected, strict=True)), warm

    linear = lrs_used(WarmupLinearSchedule(name="warmup_linear", warmup_steps=2, min_lr=0.2), 1.0, 7)
    assert all(close(a, b) for a, b in zip(linear, [0.5, 1.0, 0.84, 0.68, 0.52, 0.36, 0.2], strict=True)), linear

    inv = lrs_used(InverseSqrtSchedule(name="inverse_sqrt", warmup_steps=4), 1.0, 16)
    assert close(inv[0], 0.25) and close(inv[3], 1.0) and close(inv[15], 0.5)  # sqrt(4 / 16)

    step = lrs_used(StepSchedule(name="step", step_size=3, gamma=0.5), 1.0, 7)
    assert step == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("name", ["warmup_linear", "warmup_cosine", "inverse_sqrt"])
def test_warmup_starts_near_zero_and_reaches_lr(name: str) -> None:
    spec = SCHEDULES[name](name=name, warmup_steps=W)
    used = lrs_used(spec, LR, T)
    assert close(used[0], LR / W)
    assert used[0] < used[1] < used[W - 1]
    assert close(used[W - 1], LR)
    assert max(used) <= LR * (1 + 1e-9)


@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if s.name in ("cosine", "warmup_linear", "warmup_cosine")],
    ids=repr,
)
def test_decaying_schedules_end_at_min_lr(spec) -> None:  # noqa: ANN001
    used = lrs_used(spec, LR, T)
    assert close(used[-1], spec.min_lr)
    assert min(used) >= spec.min_lr - 1e-12
    # Monotone non-increasing once the warm-up is over.
    start = getattr(spec, "warmup_steps", 0)
    tail = used[start:]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(tail, tail[1:]))


@pytest.mark.parametrize(
    "spec",
    [
        CosineSchedule(name="cosine", min_lr=1e-4),
        ExponentialSchedule(name="exponential", gamma=0.995),
        WarmupCosineSchedule(name="warmup_cosine", warmup_steps=100, min_lr=1e-4),
    ],
    ids=repr,
)
def test_long_runs_do_not_drift_from_the_closed_form(spec) -> None:  # noqa: ANN001
    total = 1500
    used = lrs_used(spec, 0.05, total)
    expected = closed_form(spec, 0.05, total)
    assert all(close(used[s], expected(s)) for s in range(total))


def test_schedule_built_from_a_job_spec_uses_its_total_steps() -> None:
    job = JobSpec.model_validate(
        {
            "dataset": {"name": "iris"},
            "batch_size": 16,
            "epochs": 3,
            "optimizer": {"name": "sgd", "lr": 0.2},
            "schedule": {"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 0.01},
        }
    )
    assert job.total_steps == 24
    used = lrs_used(job.schedule, job.optimizer.lr, job.total_steps)
    expected = closed_form(job.schedule, job.optimizer.lr, job.total_steps)
    assert all(close(used[s], expected(s)) for s in range(job.total_steps))
    assert close(used[-1], 0.01)



@pytest.mark.parametrize("name", ["warmup_linear", "warmup_cosine"])
def test_longest_accepted_warmup_still_ends_at_min_lr(name: str) -> None:
    # JobSpec accepts any warmup_steps < total_steps, so W = T - 1 is a valid job; its
    # last step (s = T - 1) must still train at min_lr, as the docstring promises.
    job = JobSpec.model_validate(
        {
            "dataset": {"name": "iris"},
            "batch_size": 16,
            "epochs": 3,
            "optimizer": {"name": "sgd", "lr": 0.2},
            "schedule": {"name": name, "warmup_steps": 23, "min_lr": 0.01},
        }
    )
    assert job.total_steps == 24
    used = lrs_used(job.schedule, job.optimizer.lr, job.total_steps)
    assert close(used[22], 0.2)  # end of the warm-up
    assert close(used[23], 0.01), f"the last step trains at {used[23]}, not min_lr"
