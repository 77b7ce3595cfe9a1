"""Reading a learning-rate range test (Smith, 2017): loss against a learning rate that
grew exponentially every step. Torch-free.

The loss is smoothed (a bias-corrected moving average, as the trainer's stopping rule
smooths it) and cut where it exploded. The suggested learning rate is where the
smoothed loss falls fastest against log(lr) — before its minimum; past the minimum
the rate is already too large. The bounds a later search could use run from a tenth
of the suggestion to the lr of the lowest loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class LossExplosionWatch:
    """The range test's stopping rule (Smith, 2017; fastai's lr_find), used by the trainer
    to stop and by `analyse` to read: the loss, smoothed with a bias-corrected exponential
    moving average, above `factor` times the best smoothed loss so far, or NaN/infinite."""

    BETA = 0.98

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.average = 0.0
        self.count = 0
        self.best = math.inf
        self.smoothed = math.nan  # the latest smoothed loss

    def exploded(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        self.count += 1
        self.average = self.BETA * self.average + (1 - self.BETA) * loss
        self.smoothed = self.average / (1 - self.BETA**self.count)
        self.best = min(self.best, self.smoothed)
        return self.smoothed > self.factor * self.best


def analyse(lrs: list[float], losses: list[float], stop_factor: float = 4.0) -> dict[str, Any]:
    """{"suggested_lr", "min_loss_lr", "bounds", "exploded_at_lr", "points"} from per-step (lr, loss)."""
    pairs = [(lr, loss) for lr, loss in zip(lrs, losses) if lr > 0]
    finite = [(lr, loss) for lr, loss in pairs if math.isfinite(loss)]
    if len(finite) < 5:
        return {"suggested_lr": None, "min_loss_lr": None, "bounds": None, "exploded_at_lr": None, "points": 0,
                "reason": "fewer than 5 steps with a finite loss: widen the range or lower min_lr"}  # fmt: skip
    watch, kept = LossExplosionWatch(stop_factor), []
    for _lr, loss in finite:  # the smoothed loss up to where the trainer's rule calls an explosion
        if watch.exploded(loss):
            break
        kept.append(watch.smoothed)
    end = len(kept)
    lr, smoothed = np.array([p[0] for p in finite[:end]]), np.array(kept)
    lowest = int(np.argmin(smoothed))
    slope = np.gradient(smoothed, np.log(lr)) if len(lr) > 2 else np.zeros(len(lr))
    # The steepest descent before the lowest point (skipping the first few noisy steps).
    start = min(len(lr) // 10, max(0, lowest - 1))
    steepest = start + int(np.argmin(slope[start : lowest + 1])) if lowest > start else lowest
    suggested = float(lr[steepest]) if slope[steepest] < 0 else float(lr[lowest]) / 10
    exploded_lr = float(finite[end][0]) if end < len(finite) else None
    return {
        "suggested_lr": suggested,
        "min_loss_lr": float(lr[lowest]),
        "bounds": [suggested / 10, float(lr[lowest])],
        "exploded_at_lr": exploded_lr,
        "points": len(finite),
        "reason": None,
    }
