"""Models: arch -> builder(spec, n_features, n_classes)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from jobs.spec import MLPModel

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


def build_mlp(spec: MLPModel, n_features: int, n_classes: int) -> nn.Module:
    # Plain nn.Sequential of stock layers: a pickled model loads with torch alone.
    layers: list[nn.Module] = []
    width = n_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[spec.activation]()]
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": build_mlp,
}
