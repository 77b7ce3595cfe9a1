"""Extreme eigenvalues of a loss's Hessian from Hessian-vector products, and what they say.

Pure math on a loss and its parameters: nothing here knows the trainer. The loss is
given as `loss_terms`, a callable returning an iterable of scalar tensors whose sum is
the loss (a large evaluation set is summed chunk by chunk, each chunk's mean loss
weighted by its share of the samples). Each Hessian-vector product is one double
backward per chunk (Pearlmutter's trick); the Hessian itself is never formed, except
for models of at most `dense_below` parameters, where n products give it exactly.

Lanczos (ARPACK via scipy.sparse.linalg.eigsh on a LinearOperator) finds the top-k
eigenvalues by magnitude. If those include a negative one, the most negative
eigenvalue is among them (its magnitude is at least that one's), and likewise for the
largest; only a missing end needs a second Lanczos run.

The verdict (scale-free thresholds, see `critical_point_verdict`), from the decrease a
gradient step of 1/lambda_max promises, ||grad L||^2 / (2 lambda_max), as a share of L:
  no_finite_minimum  that share > gradient_tolerance, and every sample is classified right:
                     the loss falls toward 0 as the logits grow and never reaches it
  not_critical       that share > gradient_tolerance otherwise: still descending
  saddle_point       else, lambda_min < -curvature_tolerance * max |lambda|
  local_minimum      else (no direction of significant negative curvature)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

LossTerms = Callable[[], Iterable[torch.Tensor]]

DENSE_BELOW = 64  # parameters: at most this many, the exact Hessian (n products) is as cheap as Lanczos
LANCZOS_TOL = 1e-3  # relative accuracy of the eigenvalues (ARPACK tol)
LANCZOS_BASIS = 40  # Lanczos vectors kept between restarts
LANCZOS_MAXITER = 300  # restarts of ARPACK; a run that does not converge keeps what it has


class Verdict(StrEnum):
    local_minimum = "local_minimum"
    saddle_point = "saddle_point"
    not_critical = "not_critical"
    no_finite_minimum = "no_finite_minimum"


@dataclass(frozen=True)
class HessianSpectrum:
    loss: float
    gradient_norm: float
    max_eig: float
    min_eig: float
    top_eigenvalues: list[float]  # by decreasing magnitude
    hvp_count: int  # Hessian-vector products computed (each one a double backward over the set)

    @property
    def positive_fraction(self) -> float:
        """Fraction of positive eigenvalues among the top-k by magnitude (the "minimum ratio")."""
        return sum(1 for e in self.top_eigenvalues if e > 0) / len(self.top_eigenvalues)

    @property
    def predicted_decrease(self) -> float:
        """||grad L||^2 / (2 lambda_max): how much a gradient step of 1/lambda_max lowers the
        loss on its quadratic model, and at least how much it lowers the loss itself where
        lambda_max bounds the curvature along the step (the descent lemma). The largest
        curvature, not the curvature along the gradient: the step it sets is one gradient
        descent can take, where g'Hg of a flat direction would extrapolate a quadratic far
        beyond where it holds. inf when the gradient meets no positive curvature at all."""
        if self.gradient_norm == 0:
            return 0.0
        if self.max_eig <= 0:
            return math.inf
        return self.gradient_norm**2 / (2 * self.max_eig)

    @property
    def predicted_decrease_ratio(self) -> float:
        """`predicted_decrease` as a share of the loss: the same number for a loss scaled by
        any factor, and for a cross-entropy near a separable fit, where the gradient, the
        curvature and the loss all shrink together."""
        decrease = self.predicted_decrease
        if decrease == 0:
            return 0.0
        return decrease / abs(self.loss) if self.loss != 0 else math.inf

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {
            "positive_fraction": self.positive_fraction,
            "predicted_decrease": self.predicted_decrease,
            "predicted_decrease_ratio": self.predicted_decrease_ratio,
        }


def flat_gradient(loss_terms: LossTerms, params: Sequence[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(loss, flattened gradient)."""
    total_loss = 0.0
    total = [torch.zeros_like(p) for p in params]
    for term in loss_terms():
        grads = torch.autograd.grad(term, params, allow_unused=True)
        for acc, g in zip(total, grads):
            if g is not None:
                acc += g
        total_loss += term.item()
    return total_loss, torch.cat([g.reshape(-1) for g in total])


class HessianOperator:
    """v -> H v for the flattened parameters, counting the products."""

    def __init__(self, loss_terms: LossTerms, params: Sequence[torch.Tensor]) -> None:
        self.loss_terms, self.params = loss_terms, list(params)
        self.size = sum(p.numel() for p in self.params)
        self.count = 0

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        self.count += 1
        pieces = list(torch.split(vector, [p.numel() for p in self.params]))
        v = [piece.reshape(p.shape) for piece, p in zip(pieces, self.params)]
        total = [torch.zeros_like(p) for p in self.params]
        for term in self.loss_terms():
            grads = torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True)
            used = [(g, vi) for g, vi in zip(grads, v) if g is not None]
            dot = sum((g * vi).sum() for g, vi in used)
            if not isinstance(dot, torch.Tensor) or not dot.requires_grad:
                continue  # the loss is linear in every parameter here
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            for acc, h in zip(total, hv):
                if h is not None:
                    acc += h
        return torch.cat([h.reshape(-1) for h in total]).detach()

    def dense(self) -> torch.Tensor:
        """The whole Hessian, one column per product (symmetrised against rounding)."""
        first = self.params[0]
        eye = torch.eye(self.size, dtype=first.dtype, device=first.device)
        columns = torch.stack([self(eye[i]) for i in range(self.size)], dim=1)
        return (columns + columns.T) / 2


def extreme_eigenvalues(
    loss_terms: LossTerms,
    params: Sequence[torch.Tensor],
    top_k: int = 10,
    seed: int = 0,
    dense_below: int = DENSE_BELOW,
) -> HessianSpectrum:
    """The top-k eigenvalues by magnitude and the two extreme ones of the loss's Hessian."""
    params = [p for p in params if p.requires_grad]
    loss, gradient = flat_gradient(loss_terms, params)
    operator = HessianOperator(loss_terms, params)
    n = operator.size
    k = min(top_k, n)
    if n <= max(dense_below, k + 1):  # eigsh needs k < n; tiny problems are exact anyway
        eigenvalues = torch.linalg.eigvalsh(operator.dense().double()).cpu().numpy()
        by_magnitude = eigenvalues[np.argsort(-np.abs(eigenvalues), kind="stable")][:k]
        return HessianSpectrum(loss, gradient.norm().item(), float(eigenvalues.max()), float(eigenvalues.min()),
                               [float(e) for e in by_magnitude], operator.count)  # fmt: skip

    first = params[0]
    rng = np.random.default_rng(seed)  # the starting vector: its own generator, no global state touched

    def matvec(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1), device=first.device, dtype=first.dtype)
        return operator(v).double().cpu().numpy()

    linear = LinearOperator((n, n), matvec=matvec, dtype=np.float64)

    def lanczos(which: str, count: int) -> np.ndarray:
        try:
            # A longer Lanczos basis than ARPACK's default (2k+1, at least 20) takes ~20% fewer
            # products on network Hessians, whose top eigenvalues are clustered; on small
            # problems it only adds products.
            ncv = min(n - 1, max(2 * count + 1, LANCZOS_BASIS if n >= 1000 else 20))
            return eigsh(linear, k=count, which=which, ncv=ncv, tol=LANCZOS_TOL, maxiter=LANCZOS_MAXITER,
                         v0=rng.standard_normal(n), return_eigenvectors=False)  # fmt: skip
        except ArpackNoConvergence as exc:  # what converged is still right
            if len(exc.eigenvalues) == 0:
                raise
            return np.asarray(exc.eigenvalues).real

    top = lanczos("LM", k)
    top = top[np.argsort(-np.abs(top), kind="stable")]
    max_eig = float(top.max()) if (top > 0).any() else float(lanczos("LA", 1).max())
    min_eig = float(top.min()) if (top < 0).any() else float(lanczos("SA", 1).min())
    return HessianSpectrum(loss, gradient.norm().item(), max_eig, min_eig, [float(e) for e in top], operator.count)


def critical_point_verdict(
    spectrum: HessianSpectrum,
    gradient_tolerance: float = 1e-2,
    curvature_tolerance: float = 1e-2,
    fits_every_sample: bool = False,
) -> Verdict:
    """Scale-free thresholds, so that they mean the same for any loss and at any depth:

    - a point is critical only when a gradient step would barely move the loss: the
      decrease a step of 1/lambda_max promises, ||grad L||^2 / (2 lambda_max), at most
      `gradient_tolerance` times |L|. Relative to the loss and to the curvature both: a
      gradient comparable to the loss is large (cross-entropy near a separable fit has
      ||g|| ~ L ~ lambda_max, all tiny in absolute terms, and falls by a steady share of
      itself every step), and a gradient along which the loss curves sharply is not;
    - past that test, a point that is not critical and at which every sample is
      classified correctly (`fits_every_sample`, the caller's to say: the logits' margins
      all positive) is `no_finite_minimum`: scaling the last layer scales the logits and
      drives cross-entropy, or the softmax's squared error, toward 0 without reaching it.
      There is no minimum ahead to be near, only a loss still descending;
    - curvature is "significantly negative" when lambda_min < -curvature_tolerance *
      max |lambda|: Lanczos and float32 leave tiny negative eigenvalues in the flat
      directions of any network, which say nothing about a saddle.
    """
    if not (math.isfinite(spectrum.gradient_norm) and math.isfinite(spectrum.loss)):
        return Verdict.not_critical
    if not spectrum.predicted_decrease_ratio <= gradient_tolerance:
        return Verdict.no_finite_minimum if fits_every_sample else Verdict.not_critical
    scale = max(abs(spectrum.max_eig), abs(spectrum.min_eig))
    if spectrum.min_eig < -curvature_tolerance * scale:
        return Verdict.saddle_point
    return Verdict.local_minimum


def verdict_reason(
    spectrum: HessianSpectrum, verdict: Verdict, gradient_tolerance: float, curvature_tolerance: float
) -> str:
    """One sentence a person can check against the numbers: what decided the verdict."""
    step = f"a gradient step of 1/λ_max would lower the loss by {spectrum.predicted_decrease_ratio:.3g} of it"
    scale = max(abs(spectrum.max_eig), abs(spectrum.min_eig))
    curvature = f"λ_min/max|λ| = {spectrum.min_eig / scale:.3g}" if scale > 0 else "the Hessian is zero"
    if verdict == Verdict.no_finite_minimum:
        return (f"every sample is classified correctly and {step} (tolerance {gradient_tolerance:g}): "
                "the loss falls toward 0 as the logits grow, with no minimum to reach")  # fmt: skip
    if verdict == Verdict.not_critical:
        if not (math.isfinite(spectrum.gradient_norm) and math.isfinite(spectrum.loss)):
            return "the loss or its gradient is not finite"
        return f"still descending: {step} (tolerance {gradient_tolerance:g})"
    if verdict == Verdict.saddle_point:
        return f"critical ({step}), with negative curvature: {curvature} (tolerance -{curvature_tolerance:g})"
    return f"critical ({step}), no significant negative curvature: {curvature} (tolerance -{curvature_tolerance:g})"
