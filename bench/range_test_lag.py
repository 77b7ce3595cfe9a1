"""How far the range test's reading lands from the true steepest and lowest points, in
decades, on the synthetic curves of tests/unit/test_lr_range.py: the reading of
jobs/lr_range.analyse against the one it replaced (fastai's: the steepest point and the
minimum of the causal moving average, beta = 0.98).

    PYTHONPATH=$PWD python bench/range_test_lag.py
"""

from __future__ import annotations

import math

import numpy as np

from jobs.lr_range import LossExplosionWatch, analyse
from tests.unit.test_lr_range import SYNTHETIC, gompertz_drop, synthetic_run


def moving_average_reading(lrs: list[float], losses: list[float], stop_factor: float = 4.0) -> dict[str, float]:
    """The reading before: argmin of the slope of the beta = 0.98 average, and its argmin."""
    watch, kept = LossExplosionWatch(stop_factor), []
    for loss in losses:
        if watch.exploded(loss):
            break
        kept.append(watch.smoothed)
    lr, smoothed = np.array(lrs[: len(kept)]), np.array(kept)
    lowest = int(np.argmin(smoothed))
    slope = np.gradient(smoothed, np.log(lr))
    start = min(len(lr) // 10, max(0, lowest - 1))
    steepest = start + int(np.argmin(slope[start : lowest + 1])) if lowest > start else lowest
    return {"suggested_lr": float(lr[steepest]), "min_loss_lr": float(lr[lowest])}


def main() -> None:
    for noise, seeds in ((0.0, [0]), (0.05, range(5))):
        print(f"noise {noise:.0%} per step, {len(SYNTHETIC)} curves x {len(seeds)} seeds")
        print("  steps  reading          suggestion: mean  max|.|   lowest (sigmoids): mean  max|.|")
        for steps in (100, 300, 1000, 3000):
            for name, read in (("moving average", moving_average_reading), ("centred fit", analyse)):
                late, low = [], []
                for shape, centre, width, wall in SYNTHETIC:
                    for seed in seeds:
                        lrs, losses, steepest, lowest = synthetic_run(shape, centre, width, wall, steps, noise, seed)
                        reading = read(lrs, losses)
                        late.append(math.log10(reading["suggested_lr"]) - steepest)
                        if shape is not gompertz_drop:
                            low.append(math.log10(reading["min_loss_lr"]) - lowest)
                late_a, low_a = np.array(late), np.array(low)
                print(f"  {steps:5d}  {name:15s}  {late_a.mean():+.3f}  {abs(late_a).max():.3f}"
                      f"              {low_a.mean():+.3f}  {abs(low_a).max():.3f}")


if __name__ == "__main__":
    main()
