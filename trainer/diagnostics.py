"""In-loop probes of what the optimizer does, and the end-of-run per-class metrics.

The probes follow the recipe's StepWindow design: on a probe step they leave their
values on the device (a few foreach ops), and `drain()` copies a whole window back
to the host at once. No probe step waits on the device.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn

from jobs.spec import DiagnosticsSpec
from trainer.reporting import Reporter

# Past this many parameters, a random sample stands for all of them (quantiles of 1M
# samples are within ~0.1 percentile point of the whole's).
QUANTILE_SAMPLE = 1 << 20
QUANTILES = (0.1, 0.5, 0.9)
QUANTILE_NAMES = ("effective_lr_p10", "effective_lr_median", "effective_lr_p90")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. ]")


def metric_safe(name: str) -> str:
    """A name MLflow accepts as one segment of a metric key: no '/', and no '.'-only
    segment (MLflow refuses keys that are not a normalised path)."""
    safe = _UNSAFE.sub("_", name)
    return safe if safe.strip(".") else "_" * max(1, len(safe))


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Every parameter's lr / (sqrt(v_hat) + eps), flattened, from the state torch.optim keeps.

    v_hat is Adam's bias-corrected second moment (the AMSGrad maximum with amsgrad),
    RMSProp's running average (minus the squared mean gradient when centered), AdaGrad's
    sum (with its lr_decay applied to lr). None before the optimizer's first step.
    """
    # Per tensor: lr / (sqrt(v * scale) + eps), computed for all tensors at once with
    # foreach ops (a handful of kernels, not a handful per tensor).
    vs: list[torch.Tensor] = []
    scales, lrs, epss = [], [], []
    for group in optimizer.param_groups:
        lr, eps = group["lr"], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step, scale = float(state["step"]), 1.0
            if "exp_avg_sq" in state:  # adam, adamw
                v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                scale = 1 / (1 - group["betas"][1] ** step)  # bias correction
            elif "square_avg" in state:  # rmsprop
                v = state["square_avg"]
                if group.get("centered"):
                    v = v - state["grad_avg"] ** 2
            elif "sum" in state:  # adagrad
                v = state["sum"]
                lr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
            else:
                continue
            vs.append(v)
            scales.append(scale)
            lrs.append(lr)
            epss.append(eps)
    if not vs:
        return None
    rates = torch._foreach_mul(vs, scales)
    torch._foreach_sqrt_(rates)
    torch._foreach_add_(rates, epss)
    torch._foreach_reciprocal_(rates)
    torch._foreach_mul_(rates, lrs)
    return torch.cat([r.reshape(-1) for r in rates])


def sampled_quantiles(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The QUANTILES (nearest rank) of values, on the device. kthvalue is a selection, not
    a sort: 4x cheaper than torch.quantile (which also refuses more than 2**24 values)."""
    if values.numel() > QUANTILE_SAMPLE:
        values = values[torch.randint(values.numel(), (QUANTILE_SAMPLE,), generator=generator, device=values.device)]
    n = values.numel()
    return torch.stack([torch.kthvalue(values, round(q * (n - 1)) + 1).values for q in QUANTILES])


class StepProbes:
    """Per-parameter gradient norms, update/weight ratios and effective learning rates,
    every `every_steps` steps. Call `before_step` after backward and `after_step` after
    optimizer.step() (before the schedule moves lr), on steps where `due(step)`."""

    def __init__(
        self, spec: DiagnosticsSpec, model: nn.Module, optimizer: torch.optim.Optimizer, reporter: Reporter, seed: int
    ) -> None:
        self.spec, self.optimizer, self.reporter = spec, optimizer, reporter
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [metric_safe(name) for name, _ in named]
        self.params = [p for _, p in named]
        self.every = spec.every_steps
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps: list[int] = []
        self.values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._before: list[torch.Tensor] | None = None
        self.seconds: dict[str, float] = defaultdict(float)  # host time spent per probe

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def before_step(self, step: int) -> None:
        self.steps.append(step)
        if self.spec.layer_grad_norms:
            start = time.perf_counter()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            self.values["grad_norm"].append(torch.stack(torch._foreach_norm(grads)))
            self.seconds["layer_grad_norms"] += time.perf_counter() - start
        if self.spec.update_ratio:
            start = time.perf_counter()
            with torch.no_grad():
                self._before = torch._foreach_mul(self.params, 1.0)  # copies, in one op
            self.seconds["update_ratio"] += time.perf_counter() - start

    @torch.no_grad()
    def after_step(self) -> None:
        if self._before is not None:
            start = time.perf_counter()
            updates = torch._foreach_sub([p.detach() for p in self.params], self._before)
            update_norms = torch.stack(torch._foreach_norm(updates))
            weight_norms = torch.stack(torch._foreach_norm(self._before))
            # A tensor of zeros (a fresh bias) has no scale: its ratio is the update's norm over a tiny floor.
            self.values["update_ratio"].append(update_norms / weight_norms.clamp_min(1e-12))
            self._before = None
            self.seconds["update_ratio"] += time.perf_counter() - start
        if self.spec.effective_lr:
            start = time.perf_counter()
            rates = effective_learning_rates(self.optimizer)
            if rates is not None:
                self.values["effective_lr"].append(sampled_quantiles(rates, self.generator))
            else:  # no state yet: keep the window's rows aligned
                self.values["effective_lr"].append(torch.full((len(QUANTILES),), float("nan"), device=self.device))
            self.seconds["effective_lr"] += time.perf_counter() - start

    def drain(self) -> None:
        """Report the window's probe values (one device-to-host copy per probe)."""
        if not self.steps:
            return
        start = time.perf_counter()
        rows: dict[str, list[list[float]]] = {
            name: torch.stack(values).tolist() for name, values in self.values.items()
        }
        for i, step in enumerate(self.steps):
            metrics: dict[str, float] = {}
            for prefix in ("grad_norm", "update_ratio"):
                if prefix in rows:
                    metrics.update({f"{prefix}/{name}": value for name, value in zip(self.names, rows[prefix][i])})
            if "effective_lr" in rows:
                metrics.update(dict(zip(QUANTILE_NAMES, rows["effective_lr"][i])))
            self.reporter.log_metrics(step, metrics)
        self.steps, self.values = [], defaultdict(list)
        self.seconds["drain"] += time.perf_counter() - start


def per_class_metrics(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> dict[str, object]:
    """Precision, recall, F1 and support per class, and macro-F1, from a confusion matrix
    (rows true, columns predicted). A class never predicted has precision 0 (and never
    present, recall 0), as scikit-learn's zero_division=0 does."""
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, name in enumerate(class_names):
        true_positive = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(name)] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        f1s.append(f1)
    return {"per_class": per_class, "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0}


def per_class_metric_values(summary: dict[str, object]) -> dict[str, float]:
    """The summary as MLflow metrics: val_precision/<class>, val_recall/<class>, val_f1/<class>, val_f1_macro."""
    metrics: dict[str, float] = {"val_f1_macro": float(summary["f1_macro"])}  # type: ignore[arg-type]
    for name, values in summary["per_class"].items():  # type: ignore[attr-defined]
        for key in ("precision", "recall", "f1"):
            metrics[f"val_{key}/{metric_safe(name)}"] = values[key]
    return metrics
