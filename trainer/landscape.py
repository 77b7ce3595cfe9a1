"""Loss along slices of weight space (Li et al., 2018, "Visualizing the Loss Landscape").

- 1d: theta(a) = theta_0 + a (theta_1 - theta_0), a in [-0.5, 1.5]: the straight line from
  the initial to the final weights, a bit beyond both ends (Goodfellow et al., 2015).
- 2d: theta_1 + a d_1 + b d_2 on a grid a, b in [-span, span], d_1 and d_2 random Gaussian
  directions, *filter-normalised*: each filter (row of a weight tensor) of d is scaled to
  the norm of the same filter of theta_1, so the plot does not depend on the weights'
  scale; biases and norm-layer parameters (1-D tensors) are left out (d = 0), as the
  paper does.

The model is evaluated as it is (eval mode is the caller's choice); its weights are put
back when done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LINE = (-0.5, 1.5)

Evaluate = Callable[[], float]  # the loss at the model's current weights


def filter_normalised_direction(params: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    direction = []
    for p in params:
        if p.dim() <= 1:
            direction.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        # One norm per filter (first dimension), as in Li et al.
        d_norms = d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-12)
        p_norms = p.detach().reshape(len(p), -1).norm(dim=1)
        direction.append(d * (p_norms / d_norms).reshape(-1, *[1] * (p.dim() - 1)))
    return direction


@torch.no_grad()
def _set(
    params: Sequence[torch.Tensor], base: Sequence[torch.Tensor], *terms: tuple[float, Sequence[torch.Tensor]]
) -> None:
    for i, p in enumerate(params):
        p.copy_(base[i])
        for scale, direction in terms:
            p.add_(direction[i], alpha=scale)


def linspace(low: float, high: float, resolution: int) -> list[float]:
    return torch.linspace(low, high, resolution, dtype=torch.float64).tolist()


def line_slice(
    params: Sequence[torch.Tensor], initial: Sequence[torch.Tensor], evaluate: dict[str, Evaluate], resolution: int
) -> dict[str, list[float]]:
    """{"alpha": [...], name: [loss at each alpha] for each evaluator}; alpha 0 is the initial weights, 1 the final."""
    final = [p.detach().clone() for p in params]
    towards_final = [f - i for f, i in zip(final, initial)]
    alphas = linspace(*LINE, resolution)
    out: dict[str, list[float]] = {"alpha": alphas, **{name: [] for name in evaluate}}
    try:
        for alpha in alphas:
            _set(params, initial, (alpha, towards_final))
            for name, fn in evaluate.items():
                out[name].append(fn())
    finally:
        _set(params, final)
    return out


def plane_slice(
    params: Sequence[torch.Tensor], evaluate: dict[str, Evaluate], resolution: int, span: float, seed: int
) -> dict[str, object]:
    """{"a": [...], "b": [...], name: [[loss at (a_i, b_j) for j] for i]} around the current weights."""
    generator = torch.Generator().manual_seed(seed)
    final = [p.detach().clone() for p in params]
    d1 = filter_normalised_direction(final, generator)
    d2 = filter_normalised_direction(final, generator)
    coords = linspace(-span, span, resolution)
    grids: dict[str, list[list[float]]] = {name: [] for name in evaluate}
    try:
        for a in coords:
            rows: dict[str, list[float]] = {name: [] for name in evaluate}
            for b in coords:
                _set(params, final, (a, d1), (b, d2))
                for name, fn in evaluate.items():
                    rows[name].append(fn())
            for name in evaluate:
                grids[name].append(rows[name])
    finally:
        _set(params, final)
    return {"a": coords, "b": coords, **grids}
