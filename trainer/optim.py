"""Optimizers: name -> torch.optim factory. The spec's fields map onto the constructor's."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from jobs.spec import AdagradOptimizer, AdamOptimizer, RMSpropOptimizer, SGDOptimizer

Params = Iterable[torch.nn.Parameter]


def _sgd(params: Params, s: SGDOptimizer) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.nesterov, weight_decay=s.weight_decay)


def _adagrad(params: Params, s: AdagradOptimizer) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(
        params,
        lr=s.lr,
        lr_decay=s.lr_decay,
        eps=s.eps,
        initial_accumulator_value=s.initial_accumulator_value,
        weight_decay=s.weight_decay,
    )


def _rmsprop(params: Params, s: RMSpropOptimizer) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(
        params, lr=s.lr, alpha=s.alpha, eps=s.eps, momentum=s.momentum, centered=s.centered, weight_decay=s.weight_decay
    )


def _adam(params: Params, s: AdamOptimizer) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, amsgrad=s.amsgrad)


def _adamw(params: Params, s: AdamOptimizer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, amsgrad=s.amsgrad)


OPTIMIZER_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(params: Params, spec) -> torch.optim.Optimizer:  # noqa: ANN001
    return OPTIMIZER_BUILDERS[spec.name](params, spec)
