"""The figures a study's parent run holds: what people would otherwise plot by hand."""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # no display on a worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

History = list[tuple[int, float]]  # (step, value), in step order


def mean_band(histories: list[History]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds at the steps every seed logged (NaN/inf left out)."""
    common = sorted(set.intersection(*(set(s for s, _ in h) for h in histories))) if histories else []
    if not common:
        return np.array([]), np.array([]), np.array([])
    table = np.array([[dict(h)[s] for s in common] for h in histories], dtype=float)
    table[~np.isfinite(table)] = np.nan
    with np.errstate(all="ignore"):
        return np.array(common), np.nanmean(table, axis=0), np.nanstd(table, axis=0)


def curves_figure(metric: str, groups: Mapping[str, list[History]], log_y: bool = False) -> plt.Figure:
    """One line per configuration (the mean over its seeds) with a band of +- one std."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, histories in groups.items():
        steps, mean, std = mean_band([h for h in histories if h])
        if len(steps) == 0:
            continue
        (line,) = ax.plot(steps, mean, label=f"{label} (n={len(histories)})", linewidth=1.5)
        if len(histories) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per configuration: mean over seeds, band = +-1 std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def objective_vs_lr_figure(metric: str, points: Mapping[str, list[tuple[float, float]]]) -> plt.Figure:
    """Each trial's final objective against its learning rate, one colour per optimizer."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for optimizer, pairs in sorted(points.items()):
        finite = [(lr, v) for lr, v in pairs if math.isfinite(v)]
        if finite:
            ax.scatter(*zip(*finite), label=optimizer, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel(metric)
    ax.set_title(f"final {metric} against the learning rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def schedules_figure(schedules: Mapping[str, History]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, history in schedules.items():
        if history:
            ax.plot(*zip(*history), label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedules used")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def range_test_figure(lrs: list[float], losses: list[float], suggested: float | None) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [(lr, loss) for lr, loss in zip(lrs, losses) if math.isfinite(loss) and lr > 0]
    if finite:
        ax.plot(*zip(*finite), linewidth=1.2)
    if suggested:
        ax.axvline(suggested, color="red", linestyle="--", label=f"suggested lr {suggested:.3g}")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("train_loss")
    ax.set_title("learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
