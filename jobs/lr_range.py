"""Reading a learning-rate range test (Smith, 2017): loss against a learning rate that
grew exponentially every step. Torch-free.

The loss is cut where the trainer's stopping rule called an explosion, then smoothed
without lag: a local quadratic fit against log(lr) with Gaussian weights centred on each
step (a Savitzky-Golay-like smoother), whose window is a fixed share of the run. The
suggested learning rate is where the smoothed loss falls fastest against log(lr) —
before its minimum; past the minimum the rate is already too large. The bounds a later
search could use run from a tenth of the suggestion to the lr of the lowest loss.

Why not the stopping rule's moving average (fastai's lr_find reads that one): a causal
average with beta = 0.98 trails the loss by ~49 steps, so the steepest point and the
minimum it finds come late by the lr growth of ~49 steps — half a decade on a
100-step ramp over 7 decades. A centred window has no lag (its weights are symmetric);
scaling it with the run keeps the same share of the curve in it at any length.
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


SLOPE_WINDOW = 1 / 25  # Gaussian sigma of the slope's fit, as a share of the run's steps
LEVEL_WINDOW = 1 / 60  # ... of the level's: narrower, the minimum sits against the explosion's steep wall
MIN_WINDOW = 2.0  # steps: sigma at least this (a fit needs a few points each side)
MAX_POINTS = 1000  # longer runs are averaged in consecutive groups down to about this many points first


def local_quadratic(x: np.ndarray, y: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(level, slope) at each x of a weighted least-squares quadratic around it, the
    weights Gaussian in the index distance (sigma in points, cut at 3 sigma). Symmetric
    weights: no lag. A quadratic rather than a plain average: the level keeps a
    minimum's depth and the slope is the fit's own, not a difference of noisy points."""
    n, reach = len(x), int(math.ceil(3 * sigma))
    moments = np.zeros((5, n))  # sum w dx^k, k = 0..4
    targets = np.zeros((3, n))  # sum w dx^k y, k = 0..2
    for d in range(-reach, reach + 1):
        here = np.arange(max(0, -d), min(n, n - d))
        if len(here) == 0:
            continue
        dx = x[here + d] - x[here]
        power = np.full(len(here), math.exp(-0.5 * (d / sigma) ** 2))
        for k in range(5):
            moments[k, here] += power
            if k < 3:
                targets[k, here] += power * y[here + d]
            power = power * dx
    normal = np.stack([moments[i : i + 3].T for i in range(3)], axis=1)  # (n, 3, 3)
    coefficients = np.einsum("nij,jn->ni", np.linalg.pinv(normal), targets)
    return coefficients[:, 0], coefficients[:, 1]


def vertex(x: np.ndarray, f: np.ndarray, i: int) -> float:
    """x at the vertex of the parabola through f's points i-1, i, i+1 (f[i] a local minimum):
    the extreme between grid points, so a short run is not read to the nearest step only."""
    if 0 < i < len(f) - 1:
        curvature = f[i - 1] - 2 * f[i] + f[i + 1]
        if curvature > 0:
            offset = 0.5 * (f[i - 1] - f[i + 1]) / curvature  # in [-0.5, 0.5] steps
            return float(x[i] + offset * (x[i + 1] - x[i - 1]) / 2)
    return float(x[i])


def grouped_means(values: np.ndarray, size: int) -> np.ndarray:
    """Means of consecutive groups of `size` (the last one possibly shorter)."""
    if size <= 1:
        return values
    edges = np.arange(0, len(values), size)
    return np.add.reduceat(values, edges) / np.diff(np.append(edges, len(values)))


def analyse(
    lrs: list[float],
    losses: list[float],
    stop_factor: float = 4.0,
    steps: list[int] | None = None,
    exploded_at: tuple[int, float] | None = None,
) -> dict[str, Any]:
    """{"suggested_lr", "min_loss_lr", "bounds", "exploded_at_step", "exploded_at_lr", "points"}
    from per-step (lr, loss), at `steps` (default 0, 1, ...). `exploded_at`: the trainer's
    record of the exploding (step, lr) (its metrics of those names), which the reading
    takes when given: the trainer watched every step, including one whose loss was not
    finite and so not logged. Without it, the same rule is run over the logged losses."""
    steps = list(range(len(lrs))) if steps is None else steps
    points = [(step, lr, loss) for step, lr, loss in zip(steps, lrs, losses) if lr > 0]
    finite = [(step, lr, loss) for step, lr, loss in points if math.isfinite(loss)]
    if len(finite) < 5:
        return {"suggested_lr": None, "min_loss_lr": None, "bounds": None, "points": 0,
                "exploded_at_step": None if exploded_at is None else exploded_at[0],
                "exploded_at_lr": None if exploded_at is None else exploded_at[1],
                "reason": "fewer than 5 steps with a finite loss: widen the range or lower min_lr"}  # fmt: skip
    watch, end = LossExplosionWatch(stop_factor), 0
    for step, _lr, loss in finite:  # up to where the trainer's rule calls an explosion
        if (exploded_at is not None and step >= exploded_at[0]) or watch.exploded(loss):
            break
        end += 1
    if exploded_at is None and end < len(finite):
        exploded_at = (finite[end][0], float(finite[end][1]))
    group = math.ceil(end / MAX_POINTS)
    log_lr = grouped_means(np.log10([p[1] for p in finite[:end]]), group)
    loss = grouped_means(np.array([p[2] for p in finite[:end]], dtype=np.float64), group)
    sigma = max(MIN_WINDOW, end * SLOPE_WINDOW / group)
    slope = local_quadratic(log_lr, loss, sigma)[1]
    level = local_quadratic(log_lr, loss, max(MIN_WINDOW, end * LEVEL_WINDOW / group))[0]
    lowest = int(np.argmin(level))
    # The steepest descent before the lowest point (skipping the first few noisy steps).
    start = min(len(level) // 10, max(0, lowest - 1))
    steepest = start + int(np.argmin(slope[start : lowest + 1])) if lowest > start else lowest
    min_loss_lr = 10 ** vertex(log_lr, level, lowest)
    suggested = 10 ** vertex(log_lr, slope, steepest) if slope[steepest] < 0 else min_loss_lr / 10
    return {
        "suggested_lr": suggested,
        "min_loss_lr": min_loss_lr,
        "bounds": [suggested / 10, min_loss_lr],
        "exploded_at_step": None if exploded_at is None else exploded_at[0],
        "exploded_at_lr": None if exploded_at is None else exploded_at[1],
        "points": len(finite),
        "reason": None,
    }
