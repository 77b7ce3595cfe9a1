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

BETA = 0.98


def smooth(losses: list[float]) -> np.ndarray:
    out, average = [], 0.0
    for i, loss in enumerate(losses, start=1):
        average = BETA * average + (1 - BETA) * loss
        out.append(average / (1 - BETA**i))
    return np.array(out)


def analyse(lrs: list[float], losses: list[float], stop_factor: float = 4.0) -> dict[str, Any]:
    """{"suggested_lr", "min_loss_lr", "bounds", "exploded_at_lr", "points"} from per-step (lr, loss)."""
    pairs = [(lr, loss) for lr, loss in zip(lrs, losses) if lr > 0]
    finite = [(lr, loss) for lr, loss in pairs if math.isfinite(loss)]
    if len(finite) < 5:
        return {"suggested_lr": None, "min_loss_lr": None, "bounds": None, "exploded_at_lr": None, "points": 0,
                "reason": "fewer than 5 steps with a finite loss: widen the range or lower min_lr"}  # fmt: skip
    lr = np.array([p[0] for p in finite])
    smoothed = smooth([p[1] for p in finite])
    best = np.minimum.accumulate(smoothed)
    exploded = np.flatnonzero(smoothed > stop_factor * best)
    end = int(exploded[0]) if len(exploded) else len(smoothed)
    lr, smoothed = lr[:end], smoothed[:end]
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
