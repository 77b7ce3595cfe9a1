"""Each optimizer spec builds the matching torch.optim class with the spec's hyper-parameters."""

from __future__ import annotations

import pytest
import torch

from jobs.spec import OPTIMIZERS, JobSpec
from trainer.optim import build_optimizer

# name -> (torch class, non-default settings, {param_group key: expected value})
CASES = {
    "sgd": (
        torch.optim.SGD,
        {"lr": 0.3, "momentum": 0.8, "nesterov": True, "weight_decay": 0.002},
        {"lr": 0.3, "momentum": 0.8, "nesterov": True, "weight_decay": 0.002, "dampening": 0},
    ),
    "adagrad": (
        torch.optim.Adagrad,
        {"lr": 0.04, "lr_decay": 0.01, "eps": 1e-6, "initial_accumulator_value": 0.1, "weight_decay": 0.003},
        {"lr": 0.04, "lr_decay": 0.01, "eps": 1e-6, "initial_accumulator_value": 0.1, "weight_decay": 0.003},
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        {"lr": 0.005, "alpha": 0.95, "eps": 1e-5, "momentum": 0.5, "centered": True, "weight_decay": 0.004},
        {"lr": 0.005, "alpha": 0.95, "eps": 1e-5, "momentum": 0.5, "centered": True, "weight_decay": 0.004},
    ),
    "adam": (
        torch.optim.Adam,
        {"lr": 0.002, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.005, "amsgrad": True},
        {"lr": 0.002, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0.005, "amsgrad": True},
    ),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 0.003, "betas": [0.85, 0.9], "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
        {"lr": 0.003, "betas": (0.85, 0.9), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
    ),
}

DEFAULTS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}),
    "adagrad": (
        torch.optim.Adagrad,
        {"lr": 0.01, "lr_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0, "weight_decay": 0.0},
    ),
    "rmsprop": (
        torch.optim.RMSprop,
        {"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False, "weight_decay": 0.0},
    ),
    "adam": (
        torch.optim.Adam,
        {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    ),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False},
    ),
}


def params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(3, 2).parameters())


def test_every_registered_optimizer_is_covered() -> None:
    assert set(CASES) == set(OPTIMIZERS) == set(DEFAULTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_settings_reach_the_param_groups(name: str) -> None:
    cls, settings, expected = CASES[name]
    spec = JobSpec.model_validate({"optimizer": {"name": name, **settings}}).optimizer
    model_params = params()
    optimizer = build_optimizer(model_params, spec)

    assert type(optimizer) is cls
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["params"] == model_params
    for key, value in expected.items():
        assert group[key] == value, f"{name}.{key}: {group[key]!r} != {value!r}"


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_spec_defaults_reach_the_param_groups(name: str) -> None:
    cls, expected = DEFAULTS[name]
    spec = JobSpec.model_validate({"optimizer": {"name": name}}).optimizer
    optimizer = build_optimizer(params(), spec)
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    for key, value in expected.items():
        assert group[key] == value, f"{name}.{key}: {group[key]!r} != {value!r}"


def test_adamw_weight_decay_is_decoupled() -> None:
    # One step from zero gradient: AdamW shrinks the weights by lr * wd, Adam (L2 in the gradient) does not.
    for name, expected in (("adamw", 1.0 - 0.1 * 0.5), ("adam", None)):
        weight = torch.nn.Parameter(torch.ones(4))
        spec = JobSpec.model_validate({"optimizer": {"name": name, "lr": 0.1, "weight_decay": 0.5}}).optimizer
        optimizer = build_optimizer([weight], spec)
        weight.grad = torch.zeros(4)
        optimizer.step()
        if expected is None:
            # Adam: the decay enters the gradient and the normalised step is about lr.
            assert torch.allclose(weight.detach(), torch.full((4,), 1.0 - 0.1), atol=1e-5)
        else:
            assert torch.allclose(weight.detach(), torch.full((4,), expected))


def test_sgd_step_uses_the_spec_lr() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = build_optimizer([weight], JobSpec.model_validate({"optimizer": {"name": "sgd", "lr": 0.25}}).optimizer)
    weight.grad = torch.tensor([2.0, 4.0])
    optimizer.step()
    assert torch.equal(weight.detach(), torch.tensor([0.5, -3.0]))
