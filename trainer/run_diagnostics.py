"""The diagnostics a job asked for, wired to one training run: the in-loop probes, the
Hessian at epoch ends and at the end, the loss landscape and per-class metrics at the end.

Everything here runs outside the training step (or, for the probes, on the steps the
spec names), reports through the trainer's Reporter, times itself, and leaves the
training's random streams alone: a job trains the same with diagnostics on or off.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from jobs.spec import JobSpec
from trainer.data import SplitData
from trainer.diagnostics import StepProbes, per_class_metric_values, per_class_metrics
from trainer.hessian import critical_point_verdict, extreme_eigenvalues, verdict_reason
from trainer.landscape import line_slice, plane_slice
from trainer.reporting import Reporter

EVAL_CHUNK = 4096  # samples per forward pass (a double backward keeps the chunk's graph twice)


@contextlib.contextmanager
def double_backward_kernels() -> Iterator[None]:
    """cuDNN's RNN and the fused attention kernels have no double backward: use the plain ones."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.backends.cudnn.flags(enabled=False), sdpa_kernel(SDPBackend.MATH):
        yield


def fixed_subset(n: int, max_samples: int, seed: int) -> torch.Tensor | None:
    """Indices of a seeded subset when n is larger than max_samples (None: all of them)."""
    if n <= max_samples:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values


class DiagnosticsInterrupted(Exception):
    """The job was told to stop (cancel, timeout) while a diagnostic ran."""


def json_safe(value: Any) -> Any:  # noqa: ANN401
    """NaN and infinities (a loss overflowing far out on the landscape) as None: JSON, and
    PostgreSQL's JSONB, have no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunDiagnostics:
    def __init__(
        self,
        spec: JobSpec,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,  # noqa: ANN401 - (logits, labels) -> mean loss
        data: SplitData,
        reporter: Reporter,
    ) -> None:
        self.spec, self.d = spec, spec.diagnostics
        self.model, self.optimizer, self.loss_fn, self.data, self.reporter = model, optimizer, loss_fn, data, reporter
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.probes = StepProbes(self.d, model, optimizer, reporter, spec.seed) if self.d.in_loop else None
        self.seconds: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self.landscape: dict[str, Any] | None = None
        self.interrupted = False  # told to stop during the end-of-run diagnostics
        # The 1-D slice needs the initial weights: a copy, only when asked. setup() builds the
        # model from the seed before any checkpoint is loaded, so a resumed job has them too.
        wants_line = self.d.landscape is not None and self.d.landscape.kind in ("1d", "both")
        self.initial = [p.detach().clone() for p in self.params] if wants_line else None

    @property
    def active(self) -> bool:
        return self.probes is not None or self.d.hessian is not None or self.d.landscape is not None or self.d.per_class

    # -- helpers

    def _timed(self, name: str) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def timer() -> Iterator[None]:
            self._sync()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timer()

    def _sync(self) -> None:
        if self.params and self.params[0].device.type == "cuda":
            torch.cuda.synchronize(self.params[0].device)

    def _samples(self, split: str, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored samples (an image set's uint8): each chunk becomes model inputs as it is used."""
        x, y = (self.data.x_train, self.data.y_train) if split == "train" else (self.data.x_val, self.data.y_val)
        subset = fixed_subset(len(x), max_samples, self.spec.seed)
        if subset is None:
            return x, y
        subset = subset.to(x.device)
        return x[subset], y[subset]

    def _loss_terms(self, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        n = len(x)

        def terms() -> Iterator[torch.Tensor]:
            # Every Hessian-vector product and landscape point passes here: a cancel or a
            # timeout is heard within one of them, not after minutes of Lanczos.
            if self.reporter.should_stop():
                raise DiagnosticsInterrupted
            for start in range(0, n, EVAL_CHUNK):
                xb, yb = x[start : start + EVAL_CHUNK], y[start : start + EVAL_CHUNK]
                yield self.loss_fn(self.model(self.data.inputs(xb)), yb) * (len(xb) / n)

        return terms

    @torch.no_grad()
    def _fits_every_sample(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Every sample's own logit strictly above all others (a tie is no fit: scaling the
        logits keeps it a tie, and the loss then has a floor above 0)."""
        for start in range(0, len(x), EVAL_CHUNK):
            logits = self.model(self.data.inputs(x[start : start + EVAL_CHUNK]))
            labels = y[start : start + EVAL_CHUNK]
            own = logits.gather(1, labels.unsqueeze(1))
            others = logits.scatter(1, labels.unsqueeze(1), -math.inf)
            if not bool((own.squeeze(1) > others.max(dim=1).values).all()):
                return False
        return True

    def _mean_loss(self, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN202
        terms = self._loss_terms(x, y)

        @torch.no_grad()
        def evaluate() -> float:
            return float(sum(t for t in terms()).item())

        return evaluate

    # -- hooks the recipe calls

    def at_epoch_end(self, epoch: int, step: int) -> bool:
        """The diagnostics due at this epoch's end; True when told to stop meanwhile."""
        hessian = self.d.hessian
        if hessian is not None and hessian.every_epochs and epoch % hessian.every_epochs == 0:
            if epoch < self.spec.epochs:  # the last epoch's is the end's
                try:
                    self._hessian(step, final=False)
                except DiagnosticsInterrupted:
                    return True
        return False

    def at_end(self, step: int, confusion: list[list[int]], class_names: list[str]) -> dict[str, Any]:
        """Run the end-of-training diagnostics; the JSON-ready summary for the job. Told to
        stop meanwhile, they end there (`interrupted`) with what was done."""
        try:
            self._at_end(step, confusion, class_names)
        except DiagnosticsInterrupted:
            self.interrupted = True
        self.landscape = json_safe(self.landscape)
        return json_safe(self.summary)

    def _at_end(self, step: int, confusion: list[list[int]], class_names: list[str]) -> None:
        if self.probes is not None:
            self.seconds.update({f"probes_{k}": v for k, v in self.probes.seconds.items()})
        if self.d.per_class:
            with self._timed("per_class"):
                classes = per_class_metrics(confusion, class_names)
            self.summary.update(classes)
            self.reporter.log_metrics(step, per_class_metric_values(classes))
        if self.d.hessian is not None:
            self._hessian(step, final=True)
        if self.d.landscape is not None:
            self._landscape()
        if self.seconds:
            self.summary["costs_seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
            self.reporter.log_metrics(step, {f"diagnostics_seconds/{k}": v for k, v in self.seconds.items()})

    def _hessian(self, step: int, final: bool) -> None:
        spec = self.d.hessian
        assert spec is not None
        x, y = self._samples("train", spec.max_samples)
        was_training = self.model.training
        self.model.eval()  # dropout off, batch norm on its running statistics: a fixed function
        try:
            with self._timed("hessian"), double_backward_kernels():
                spectrum = extreme_eigenvalues(self._loss_terms(x, y), self.params, spec.top_k, seed=self.spec.seed)
                fits = self._fits_every_sample(x, y)
        finally:
            self.model.train(was_training)
        lr = self.optimizer.param_groups[0]["lr"]
        verdict = critical_point_verdict(spectrum, spec.gradient_tolerance, spec.curvature_tolerance, fits)
        metrics = {
            "hessian_max_eig": spectrum.max_eig,
            "hessian_min_eig": spectrum.min_eig,
            "hessian_positive_fraction": spectrum.positive_fraction,
            "hessian_sharpness_ratio": spectrum.max_eig * lr / 2,  # > 1: plain GD at this lr is unstable
            "hessian_gradient_norm": spectrum.gradient_norm,
            "hessian_predicted_decrease_ratio": spectrum.predicted_decrease_ratio,
        }
        self.reporter.log_metrics(step, metrics)
        if final:
            self.summary["hessian"] = spectrum.as_dict() | {
                "verdict": str(verdict),
                "verdict_reason": verdict_reason(spectrum, verdict, spec.gradient_tolerance, spec.curvature_tolerance),
                "fits_every_sample": fits,
                "sharpness_ratio": metrics["hessian_sharpness_ratio"],
                "lr": lr,
                "samples": len(x),
                "parameters": sum(p.numel() for p in self.params),
                "gradient_tolerance": spec.gradient_tolerance,
                "curvature_tolerance": spec.curvature_tolerance,
            }

    def _landscape(self) -> None:
        spec = self.d.landscape
        assert spec is not None
        evaluate = {
            "train_loss": self._mean_loss(*self._samples("train", spec.max_samples)),
            "val_loss": self._mean_loss(*self._samples("val", spec.max_samples)),
        }
        self.landscape = {"kind": spec.kind, "span": spec.span, "resolution": spec.resolution}
        was_training = self.model.training
        self.model.eval()
        try:
            if self.initial is not None:
                with self._timed("landscape_1d"):
                    self.landscape["line"] = line_slice(self.params, self.initial, evaluate, spec.resolution)
            if spec.kind in ("2d", "both"):
                with self._timed("landscape_2d"):
                    self.landscape["plane"] = plane_slice(
                        self.params, evaluate, spec.resolution, spec.span, self.spec.seed
                    )
        finally:
            self.model.train(was_training)
