"""Figures of the diagnostics for MLflow: the loss-landscape slices."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a worker
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def line_figure(line: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("train_loss", "val_loss"):
        ax.plot(line["alpha"], line[name], marker=".", label=name)
    for alpha, label in ((0, "initial"), (1, "final")):
        ax.axvline(alpha, color="grey", linestyle=":", linewidth=1)
        ax.text(alpha, ax.get_ylim()[1], label, ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("alpha: theta_0 + alpha (theta_final - theta_0)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def plane_figure(plane: dict[str, Any]) -> plt.Figure:
    a, b = np.array(plane["a"]), np.array(plane["b"])
    loss = np.array(plane["train_loss"], dtype=float)  # rows: a, columns: b
    fig, ax = plt.subplots(figsize=(5.5, 5))
    finite = loss[np.isfinite(loss)]
    # Log-spaced levels: the basin and the walls both show.
    low, high = (finite.min(), finite.max()) if finite.size else (1e-3, 1.0)
    levels = np.geomspace(max(low, 1e-8), max(high, low * 1.01, 1e-7), 30)
    contour = ax.contour(b, a, np.clip(loss, levels[0], levels[-1]), levels=levels, cmap="viridis")
    fig.colorbar(contour, ax=ax, label="train loss")
    ax.plot(0, 0, marker="*", color="red", markersize=10)
    ax.set_xlabel("direction 2 (filter-normalised)")
    ax.set_ylabel("direction 1 (filter-normalised)")
    ax.set_title("training loss around the final weights")
    fig.tight_layout()
    return fig
