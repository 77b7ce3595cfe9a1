"""The range test's stopping rule, run on the device on every step.

The same rule as `jobs.lr_range.LossExplosionWatch` (a bias-corrected moving average of
the loss above `factor` times its best, or a loss that is NaN/infinite), computed with
the same float64 operations in the same order, so the step it calls is the step the
analysis calls on the logged losses. It is updated on every step with a few ops on
0-d tensors and never read back by the step: the first exploding step is kept in a
device tensor that the metrics window reads with the losses it reads anyway. Which step
exploded is then decided per step, whatever the window and checkpoint cadence; its state
goes into the checkpoint so a resumed run continues the same average.
"""

from __future__ import annotations

from typing import Any

import torch

from jobs.lr_range import LossExplosionWatch

NOT_YET = -1


class DeviceExplosionWatch:
    BETA = LossExplosionWatch.BETA

    def __init__(self, factor: float, device: torch.device) -> None:
        self.factor = factor
        self.device = device
        # float64 where the device has it: the host rule's arithmetic, to the bit.
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.count = 0  # losses averaged so far (a host int: the bias correction is a host float)
        self.average = torch.zeros((), dtype=self.dtype, device=device)
        self.best = torch.full((), float("inf"), dtype=self.dtype, device=device)
        self.first = torch.full((), NOT_YET, dtype=torch.int64, device=device)  # the first exploding step
        self.exploded_at: tuple[int, float] | None = None  # (step, lr), once a window read it back

    def update(self, step: int, loss: torch.Tensor) -> None:
        """Watch step `step`'s loss (a device scalar). No read-back."""
        self.count += 1
        value = loss.detach().to(self.dtype)
        # average = BETA * average + (1 - BETA) * loss, as the host rule computes it.
        self.average.mul_(self.BETA).add_(value * (1 - self.BETA))
        smoothed = self.average / (1 - self.BETA**self.count)
        torch.minimum(self.best, smoothed, out=self.best)
        exploded = (smoothed > self.best * self.factor).logical_or_(value.isfinite().logical_not_())
        self.first.copy_(torch.where(exploded & (self.first == NOT_YET), step, self.first))

    def first_exploding_step(self) -> int | None:
        """A read-back: call it where the host syncs anyway (the window's drain)."""
        first = int(self.first)
        return None if first == NOT_YET else first

    def state_dict(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "count": self.count,
            "average": float(self.average),
            "best": float(self.best),
            "first": int(self.first),
            "exploded_at": None if self.exploded_at is None else list(self.exploded_at),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.average.fill_(state["average"])
        self.best.fill_(state["best"])
        self.first.fill_(state["first"])
        self.exploded_at = None if state["exploded_at"] is None else (int(state["exploded_at"][0]), float(state["exploded_at"][1]))
