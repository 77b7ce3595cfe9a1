"""Learning-rate schedules, stepped once per optimizer step.

Step s (0-based) trains with lr(s); T is the run's total steps, W the warm-up.
The closed forms, which the unit tests check the schedulers against:

  constant       lr
  step           lr * gamma ** (s // step_size)
  exponential    lr * gamma ** s
  cosine         min_lr + (lr - min_lr) * (1 + cos(pi * s / (T - 1))) / 2
  warmup_linear  lr * (s + 1) / W for s < W (lr at s = W - 1), then with p = (s - W + 1) / (T - W):
                 min_lr + (lr - min_lr) * (1 - p)                 (min_lr at s = T - 1)
  warmup_cosine  as warmup_linear, with min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
  inverse_sqrt   lr * min((s + 1) / W, sqrt(W / (s + 1)))
  lr_range       min_lr * (lr / min_lr) ** (s / (T - 1))   (min_lr at s = 0, lr at s = T - 1)

torch's own schedulers where one exists; LambdaLR with the closed form for the warm-up ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR, LRScheduler, StepLR


def _decay_fraction(step: int, warmup: int, total: int) -> float:
    """0 at the warm-up's peak (step W - 1), 1 at the last step (T - 1)."""
    return min(1.0, max(0.0, (step - warmup + 1) / max(1, total - warmup)))


def warmup_multiplier(warmup: int, total: int, floor: float, decay: str) -> Callable[[int], float]:
    """lr(s) / lr for a linear warm-up followed by a linear or cosine decay to `floor` (= min_lr / lr)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = _decay_fraction(step, warmup, total)
        shape = 1.0 - p if decay == "linear" else (1.0 + math.cos(math.pi * p)) / 2.0
        return floor + (1.0 - floor) * shape

    return multiplier


def inverse_sqrt_multiplier(warmup: int) -> Callable[[int], float]:
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def range_test_multiplier(floor: float, total: int) -> Callable[[int], float]:
    """lr(s) / lr of the range test: exponential from `floor` (= min_lr / lr) to 1."""
    return lambda step: floor ** (1.0 - min(step, total - 1) / max(1, total - 1))


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]


def constant_schedule(optimizer: torch.optim.Optimizer) -> LambdaLR:
    schedule = LambdaLR(optimizer, lambda step: 1.0)
    schedule.constant = True  # schedule_stepper: the lr never changes, nothing to step
    return schedule


SCHEDULE_BUILDERS: dict[str, Callable[[torch.optim.Optimizer, object, int], LRScheduler]] = {
    "constant": lambda opt, s, total: constant_schedule(opt),
    "step": lambda opt, s, total: StepLR(opt, step_size=s.step_size, gamma=s.gamma),
    "exponential": lambda opt, s, total: ExponentialLR(opt, gamma=s.gamma),
    "cosine": lambda opt, s, total: CosineAnnealingLR(opt, T_max=max(1, total - 1), eta_min=s.min_lr),
    "warmup_linear": lambda opt, s, total: LambdaLR(
        opt, warmup_multiplier(s.warmup_steps, total, s.min_lr / _base_lr(opt), "linear")
    ),
    "warmup_cosine": lambda opt, s, total: LambdaLR(
        opt, warmup_multiplier(s.warmup_steps, total, s.min_lr / _base_lr(opt), "cosine")
    ),
    "inverse_sqrt": lambda opt, s, total: LambdaLR(opt, inverse_sqrt_multiplier(s.warmup_steps)),
    "lr_range": lambda opt, s, total: LambdaLR(opt, range_test_multiplier(s.min_lr / _base_lr(opt), total)),
}


def build_schedule(optimizer: torch.optim.Optimizer, spec, total_steps: int) -> LRScheduler:  # noqa: ANN001
    return SCHEDULE_BUILDERS[spec.name](optimizer, spec, total_steps)


def schedule_stepper(schedule: LRScheduler) -> Callable[[], None] | None:
    """`schedule.step`, as the training step calls it; None for a constant schedule, whose
    lr never changes (the caller sets its counters from the step when its state is taken).

    LambdaLR.step costs ~10 us a step in bookkeeping (warnings, context managers,
    re-reading every group): ~1.5% of a small model's CPU step. For LambdaLR (constant
    and the warm-up schedules) this does what LambdaLR.step does -- the same counters,
    the same lr = base_lr * lambda(last_epoch) -- so the state_dict, and resuming, are
    unchanged; the others keep torch's own step (their recursive forms stay torch's).
    """
    if type(schedule) is not LambdaLR or any(isinstance(g["lr"], torch.Tensor) for g in schedule.optimizer.param_groups):
        return schedule.step

    if getattr(schedule, "constant", False):
        return None  # base_lr * 1.0 is what every group holds already

    def step() -> None:
        # Looked up on every call: loading a state_dict replaces the optimizer's groups and the base lrs.
        schedule._step_count += 1
        schedule.last_epoch += 1
        epoch = schedule.last_epoch
        lrs = [base_lr * lmbda(epoch) for lmbda, base_lr in zip(schedule.lr_lambdas, schedule.base_lrs)]
        for group, lr in zip(schedule.optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs

    return step
