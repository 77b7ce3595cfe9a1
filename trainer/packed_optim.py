"""The optimizers of a pack: torch.optim's update rules over [K, P] tensors, one row per trial.

Each rule is the one torch.optim runs for a CPU tensor (its single-tensor path, the one a
solo job takes), written once over the whole pack: every hyperparameter is a [K, 1] column,
so trials with different lr, momentum, betas, eps, weight decay step together in the same
few kernels, and a flag that differs between trials (nesterov, amsgrad, centered) selects
per row. The per-step scalars torch computes in Python (bias corrections, Adagrad's decayed
lr) are computed here the same way, as Python floats on the host, a window of steps at a
time: no host sync inside the step.

Bit for bit: each rule makes torch's roundings in torch's order. A [K, 1] column cast to
float32 rounds as torch's Python scalar does; `x.add(y, alpha=s)` (one fused multiply-add)
is `torch.addcmul(x, y, s)`; `x.addcdiv(y, z, value=s)` is `x + (s * y) / z`, i.e.
`x.addcdiv(s * y, z)`. From equal gradients a packed step makes the solo step's weights
exactly, every family (torch's fused CPU kernels, `use_fused`, order their arithmetic
otherwise: a trial drifted 1.9e-4 from its solo run over 69 digits-MLP Adam steps).

A trial's state goes to and from a solo torch optimizer (`export_to`, `import_from`), so a
pack's checkpoint is a solo checkpoint: a trial resumes alone or packed.

Measured alternative (bench/packing.py --optimizer-variants): torch.optim itself, one
optimizer per trial over views of the stacked rows, is exact by construction but spends
K Python-level steps per step; these stacked rules take the same few kernels for any K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).view(-1, 1)


def _flag(values: Sequence[bool], device: torch.device) -> bool | torch.Tensor:
    """One bool when every trial agrees (the branch is static), else a [K, 1] mask."""
    if all(values) or not any(values):
        return bool(values[0])
    return torch.tensor(list(values), device=device).view(-1, 1)


def _select(flag: bool | torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    if isinstance(flag, bool):
        return if_true if flag else if_false
    return torch.where(flag, if_true, if_false)


@dataclass
class WindowPlan:
    lrs: np.ndarray  # [n, K]
    coefficients: dict[str, torch.Tensor] | None = None  # the broadcast rule's, [n, K, 1] each
    fused_calls: list[list[int]] | None = None  # the trials of each kernel call


class StackedOptimizer:
    """Base: state tensors [K, P] by torch's state names, hyperparameters per trial."""

    STATE: tuple[str, ...] = ()
    HAS_STEP = True  # torch keeps a 'step' tensor in each parameter's state

    def __init__(self, groups: list[dict], n_params: int, device: torch.device) -> None:
        self.groups = groups  # each trial's param_groups[0], without 'params'
        self.device = device
        self.steps_done = 0  # steps taken (the same for every trial of a pack)
        self.state = {name: torch.zeros(len(groups), n_params, device=device) for name in self.STATE}
        self._hyper()

    def _hyper(self) -> None:
        """Columns and flags from self.groups (again after trials are dropped)."""

    def _value(self, name: str) -> torch.Tensor:
        return _column([g[name] for g in self.groups], self.device)

    def keeps(self, name: str, group: dict) -> bool:
        """Whether torch keeps this state for a trial with these hyperparameters."""
        return True

    # torch's fused kernel for this rule (one pass over memory for all of a call's tensors), and
    # the scalars it takes besides lr; trials whose scalars and lr agree share one call.
    FUSED: Callable[..., None] | None = None
    use_fused = False  # True: torch's fused kernels, not bit for bit the solo step (bench/packing.py measures both)

    def fused_scalars(self, group: dict) -> dict[str, Any]:
        raise NotImplementedError

    def fused_state(self, group: dict) -> list[str | None]:
        """The state lists the fused kernel takes after params and grads, by torch's names (None: empty)."""
        raise NotImplementedError

    def window(self, lrs: np.ndarray) -> WindowPlan:
        """What the next len(lrs) steps need (lrs: [n, K]): per-step scalars, computed on the host."""
        if self.FUSED is not None and self.use_fused:
            return WindowPlan(lrs=lrs, fused_calls=self._fused_calls(lrs))
        return WindowPlan(lrs=lrs, coefficients=self.coefficients(lrs))

    def _fused_calls(self, lrs: np.ndarray) -> list[list[int]]:
        """Trials that can share a kernel call in this window: equal scalars and equal lrs."""
        calls: dict[Any, list[int]] = {}
        for k, group in enumerate(self.groups):
            scalars = self.fused_scalars(group)
            key = (tuple(sorted(scalars.items())), tuple(self.fused_state(group)), lrs[:, k].tobytes())
            calls.setdefault(key, []).append(k)
        return list(calls.values())

    def update(self, flat: torch.Tensor, grad: torch.Tensor, plan: WindowPlan, i: int) -> None:
        """Step i of the window: the fused kernels, or the broadcast rule."""
        if plan.fused_calls is None:
            self.broadcast_update(flat, grad, {name: c[i] for name, c in plan.coefficients.items()})
            self._steps_done += 1  # (not the setter: the step tensors are the fused path's)
            return
        params, grads = flat.unbind(0), grad.unbind(0)
        rows = {name: s.unbind(0) for name, s in self.state.items()}
        if self.HAS_STEP:
            torch._foreach_add_(self.step_tensors, 1)
        for members in plan.fused_calls:
            group = self.groups[members[0]]
            state_lists = [[rows[name][k] for k in members] if name else [] for name in self.fused_state(group)]
            extra = [[self.step_tensors[k] for k in members]] if self.HAS_STEP else []
            self.FUSED(
                [params[k] for k in members], [grads[k] for k in members], *state_lists, *extra,
                lr=float(plan.lrs[i, members[0]]), **self.fused_scalars(group),
            )
        self._steps_done += 1

    @property
    def steps_done(self) -> int:
        return self._steps_done

    @steps_done.setter
    def steps_done(self, value: int) -> None:
        self._steps_done = value
        if self.HAS_STEP:  # the fused kernels read (and keep) each trial's step as a tensor
            self.step_tensors = [torch.tensor(float(value), device=self.device) for _ in self.groups]

    def coefficients(self, lrs: np.ndarray) -> dict[str, torch.Tensor]:
        """Per-step scalars of the broadcast rule for the next len(lrs) steps: {name: [n, K, 1]}."""
        return {"neg_lr": self._tensor(-lrs)}

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(-1)

    def _step_numbers(self, n: int) -> np.ndarray:
        """torch's `step` as each of the next n updates sees it (incremented first): [n, 1]."""
        return np.arange(self.steps_done + 1, self.steps_done + n + 1, dtype=np.float64)[:, None]

    def broadcast_update(self, flat: torch.Tensor, grad: torch.Tensor, c: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _decayed(self, flat: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """L2 weight decay folded into the gradient (grad + wd * param), as torch's coupled form."""
        return grad.addcmul(flat, self.weight_decay) if self.any_weight_decay else grad

    def keep(self, rows: torch.Tensor) -> None:
        self.groups = [self.groups[i] for i in rows.tolist()]
        self.state = {name: s[rows] for name, s in self.state.items()}
        self.steps_done = self.steps_done
        self._hyper()

    # -- solo optimizers' state, in and out

    def import_from(self, optimizers: list[torch.optim.Optimizer], flatten: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        """Stack the solo optimizers' state; `flatten` lays one trial's per-parameter tensors out as a row."""
        self.groups = [{k: v for k, v in opt.param_groups[0].items() if k != "params"} for opt in optimizers]
        self._hyper()
        for name in self.STATE:
            rows = []
            for opt in optimizers:
                own = opt.param_groups[0]["params"]
                rows.append(flatten([opt.state[p].get(name, torch.zeros_like(p)) for p in own]))
            self.state[name] = torch.stack(rows).to(self.device)
        first = optimizers[0].state[optimizers[0].param_groups[0]["params"][0]]
        self.steps_done = int(first["step"]) if "step" in first else self._steps_from_state(optimizers)

    def _steps_from_state(self, optimizers: list[torch.optim.Optimizer]) -> int:
        return 0

    def export_to(self, k: int, optimizer: torch.optim.Optimizer, unflatten: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
        """Trial k's state into a solo optimizer, in torch's own format."""
        group = optimizer.param_groups[0]
        kept = {name: unflatten(self.state[name][k]) for name in self.STATE if self.keeps(name, self.groups[k])}
        for i, p in enumerate(group["params"]):
            entry: dict[str, torch.Tensor] = {}
            if self.HAS_STEP:
                entry["step"] = torch.tensor(float(self.steps_done))
            for name, tensors in kept.items():
                entry[name] = tensors[i].to(p.device, copy=True).contiguous()
            optimizer.state[p] = entry


class StackedSGD(StackedOptimizer):
    STATE = ("momentum_buffer",)
    HAS_STEP = False
    FUSED = torch._fused_sgd_

    def fused_scalars(self, group: dict) -> dict[str, Any]:
        return {
            "weight_decay": group["weight_decay"], "momentum": group["momentum"], "dampening": 0.0,
            "nesterov": group["nesterov"], "maximize": False, "is_first_step": self.steps_done == 0,
        }

    def fused_state(self, group: dict) -> list[str | None]:
        return ["momentum_buffer" if group["momentum"] != 0 else None]

    def _hyper(self) -> None:
        self.momentum = self._value("momentum")
        self.any_momentum = any(g["momentum"] != 0 for g in self.groups)
        self.nesterov = _flag([g["nesterov"] for g in self.groups], self.device)
        self.weight_decay = self._value("weight_decay")
        self.any_weight_decay = any(g["weight_decay"] != 0 for g in self.groups)

    def keeps(self, name: str, group: dict) -> bool:
        return group["momentum"] != 0 and self.steps_done > 0

    def _steps_from_state(self, optimizers: list[torch.optim.Optimizer]) -> int:
        # SGD keeps no step count: only whether its momentum buffers exist matters.
        return int(any(opt.state for opt in optimizers))

    def broadcast_update(self, flat: torch.Tensor, grad: torch.Tensor, c: dict[str, torch.Tensor]) -> None:
        g = self._decayed(flat, grad)
        if self.any_momentum:
            buf = self.state["momentum_buffer"]
            if self.steps_done == 0:
                buf.copy_(g)  # torch's first step: the buffer is the gradient
            else:
                buf.mul_(self.momentum).add_(g)  # (the spec has no dampening)
            g = _select(self.nesterov, g.addcmul(buf, self.momentum), buf)
        flat.addcmul_(g, c["neg_lr"])  # param.add_(grad, alpha=-lr): one fused multiply-add, as addcmul


class StackedAdam(StackedOptimizer):
    STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    @property
    def FUSED(self) -> Callable[..., None]:  # noqa: N802 - the class attribute of the others
        return torch._fused_adamw_ if self.decoupled else torch._fused_adam_

    def fused_scalars(self, group: dict) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {
            "beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"], "eps": group["eps"],
            "amsgrad": group["amsgrad"], "maximize": False,
        }

    def fused_state(self, group: dict) -> list[str | None]:
        return ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None]

    def _hyper(self) -> None:
        self.one_minus_beta1 = _column([1 - g["betas"][0] for g in self.groups], self.device)
        self.beta2 = _column([g["betas"][1] for g in self.groups], self.device)
        self.one_minus_beta2 = _column([1 - g["betas"][1] for g in self.groups], self.device)
        # One beta2 for the whole pack (an lr sweep, seed repeats): addcmul's own value, torch's
        # call exactly, and one pass over the state fewer than the [K, 1] column's g * (1 - beta2).
        beta2s = {g["betas"][1] for g in self.groups}
        self.shared_one_minus_beta2 = 1 - beta2s.pop() if len(beta2s) == 1 else None
        self.eps = self._value("eps")
        self.amsgrad = _flag([g["amsgrad"] for g in self.groups], self.device)
        self.decoupled = self.groups[0].get("decoupled_weight_decay", False)  # AdamW (the family is the pack's)
        self.weight_decay = self._value("weight_decay")
        self.any_weight_decay = any(g["weight_decay"] != 0 for g in self.groups)

    def keeps(self, name: str, group: dict) -> bool:
        return name != "max_exp_avg_sq" or group["amsgrad"]

    def coefficients(self, lrs: np.ndarray) -> dict[str, torch.Tensor]:
        # Python floats, as torch's single-tensor Adam computes them (numpy's ** 0.5 is a sqrt,
        # Python's a pow: they may differ in the last bit, which the float32 cast can keep).
        steps = [float(s) for s in self._step_numbers(len(lrs))[:, 0]]
        rows = [[g["betas"][0], g["betas"][1], g["weight_decay"]] for g in self.groups]
        return {
            "neg_step_size": self._tensor(np.array([[-(lr / (1 - b1**t)) for lr, (b1, _, _) in zip(lrs_t, rows)]
                                                    for t, lrs_t in zip(steps, lrs.tolist())])),
            "bias_correction2_sqrt": self._tensor(np.array([[(1 - b2**t) ** 0.5 for _, b2, _ in rows] for t in steps])),
            "decay": self._tensor(np.array([[1 - lr * wd for lr, (_, _, wd) in zip(lrs_t, rows)] for lrs_t in lrs.tolist()])),
        }

    def broadcast_update(self, flat: torch.Tensor, grad: torch.Tensor, c: dict[str, torch.Tensor]) -> None:
        if self.decoupled and self.any_weight_decay:
            with torch.no_grad():
                flat.mul_(c["decay"])
            g = grad
        else:
            g = self._decayed(flat, grad)
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        exp_avg.lerp_(g, self.one_minus_beta1)
        if self.shared_one_minus_beta2 is None:
            exp_avg_sq.mul_(self.beta2).addcmul_(g * self.one_minus_beta2, g)
        else:
            exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=self.shared_one_minus_beta2)
        second = exp_avg_sq
        if self.amsgrad is not False:
            torch.maximum(self.state["max_exp_avg_sq"], exp_avg_sq, out=self.state["max_exp_avg_sq"])
            second = _select(self.amsgrad, self.state["max_exp_avg_sq"], exp_avg_sq)
        denom = second.sqrt().div_(c["bias_correction2_sqrt"]).add_(self.eps)  # (in place: one buffer, not two)
        # param.addcdiv_(exp_avg, denom, value=-step_size) computes param + (value * exp_avg) / denom
        flat.addcdiv_(exp_avg * c["neg_step_size"], denom)


class StackedRMSprop(StackedOptimizer):
    STATE = ("square_avg", "momentum_buffer", "grad_avg")

    def _hyper(self) -> None:
        self.alpha = self._value("alpha")
        self.one_minus_alpha = _column([1 - g["alpha"] for g in self.groups], self.device)
        self.eps = self._value("eps")
        self.momentum = self._value("momentum")
        self.any_momentum = any(g["momentum"] > 0 for g in self.groups)
        self.all_momentum = all(g["momentum"] > 0 for g in self.groups)
        self.has_momentum = torch.tensor([g["momentum"] > 0 for g in self.groups], device=self.device).view(-1, 1)
        self.centered = _flag([g["centered"] for g in self.groups], self.device)
        self.weight_decay = self._value("weight_decay")
        self.any_weight_decay = any(g["weight_decay"] != 0 for g in self.groups)

    def keeps(self, name: str, group: dict) -> bool:
        return {"momentum_buffer": group["momentum"] > 0, "grad_avg": group["centered"]}.get(name, True)

    def broadcast_update(self, flat: torch.Tensor, grad: torch.Tensor, c: dict[str, torch.Tensor]) -> None:
        g = self._decayed(flat, grad)
        square_avg = self.state["square_avg"]
        square_avg.mul_(self.alpha).addcmul_(g * self.one_minus_alpha, g)
        if self.centered is not False:
            grad_avg = self.state["grad_avg"]
            grad_avg.lerp_(g, self.one_minus_alpha)
            avg = _select(self.centered, square_avg.addcmul(grad_avg, grad_avg, value=-1), square_avg).sqrt()
        else:
            avg = square_avg.sqrt()
        avg = avg.add_(self.eps)
        if not self.any_momentum:
            flat.addcdiv_(g * c["neg_lr"], avg)  # param.addcdiv_(grad, avg, value=-lr)
            return
        buf = self.state["momentum_buffer"]
        buf.mul_(self.momentum).addcdiv_(g, avg)
        if self.all_momentum:
            flat.addcmul_(buf, c["neg_lr"])  # param.add_(buf, alpha=-lr)
        else:  # each trial its own rule (the buffer of one without momentum is unused)
            flat.copy_(torch.where(self.has_momentum, flat.addcmul(buf, c["neg_lr"]), flat.addcdiv(g * c["neg_lr"], avg)))


class StackedAdagrad(StackedOptimizer):
    STATE = ("sum",)
    FUSED = torch._fused_adagrad_

    def fused_scalars(self, group: dict) -> dict[str, Any]:
        return {"lr_decay": group["lr_decay"], "weight_decay": group["weight_decay"], "eps": group["eps"], "maximize": False}

    def fused_state(self, group: dict) -> list[str | None]:
        return ["sum"]

    def _hyper(self) -> None:
        self.eps = self._value("eps")
        self.weight_decay = self._value("weight_decay")
        self.any_weight_decay = any(g["weight_decay"] != 0 for g in self.groups)

    def coefficients(self, lrs: np.ndarray) -> dict[str, torch.Tensor]:
        steps = [float(s) for s in self._step_numbers(len(lrs))[:, 0]]
        decays = [g["lr_decay"] for g in self.groups]
        return {"neg_lr": self._tensor(np.array([[-(lr / (1 + (t - 1) * d)) for lr, d in zip(lrs_t, decays)]
                                                 for t, lrs_t in zip(steps, lrs.tolist())]))}

    def broadcast_update(self, flat: torch.Tensor, grad: torch.Tensor, c: dict[str, torch.Tensor]) -> None:
        g = self._decayed(flat, grad)
        state_sum = self.state["sum"]
        state_sum.addcmul_(g, g)
        std = state_sum.sqrt().add_(self.eps)
        flat.addcdiv_(g * c["neg_lr"], std)  # param.addcdiv_(grad, std, value=-clr)


STACKED_OPTIMIZERS: dict[str, type[StackedOptimizer]] = {
    "sgd": StackedSGD,
    "adam": StackedAdam,
    "adamw": StackedAdam,
    "rmsprop": StackedRMSprop,
    "adagrad": StackedAdagrad,
}
