"""The shapes a dataset can be read as, and the words a 422 uses for them (torch-free).

A dataset spec lists its views (`views`: the shapes it can be read as, its natural
one first); a model spec lists the kinds it takes (`TAKES`). JobSpec pairs them:
the model reads the dataset's first view of a kind it takes, and the trainer
reshapes the tensors to that view. `dims` is the per-sample tensor shape, so the
trainer needs no other description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar


class ShapeKind(StrEnum):
    tabular = "tabular"
    image = "image"
    sequence = "sequence"


@dataclass(frozen=True)
class TabularShape:
    """F features per sample."""

    features: int
    kind: ClassVar[ShapeKind] = ShapeKind.tabular
    tokens: ClassVar[bool] = False

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.features,)

    @property
    def flat_size(self) -> int:
        return self.features

    def __str__(self) -> str:
        return f"tabular ({self.features} features)"


@dataclass(frozen=True)
class ImageShape:
    """C x H x W, channels first (torch's layout)."""

    channels: int
    height: int
    width: int
    kind: ClassVar[ShapeKind] = ShapeKind.image
    tokens: ClassVar[bool] = False

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)

    @property
    def flat_size(self) -> int:
        return math.prod(self.dims)

    def __str__(self) -> str:
        return f"image ({self.channels}x{self.height}x{self.width})"


@dataclass(frozen=True)
class SequenceShape:
    """T steps of either F float features (`features`) or one token id in [0, vocab) (`vocab`)."""

    length: int
    features: int | None = None
    vocab: int | None = None
    kind: ClassVar[ShapeKind] = ShapeKind.sequence

    def __post_init__(self) -> None:
        if (self.features is None) == (self.vocab is None):
            raise ValueError("a sequence has float features or token ids, exactly one of the two")

    @property
    def tokens(self) -> bool:
        return self.vocab is not None

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.length,) if self.tokens else (self.length, self.features)  # type: ignore[return-value]

    @property
    def step_size(self) -> int:
        """Width of one step as a model's input vector: token ids are read one-hot."""
        return self.vocab if self.tokens else self.features  # type: ignore[return-value]

    @property
    def flat_size(self) -> int:
        return self.length * self.step_size

    def __str__(self) -> str:
        if self.tokens:
            return f"sequence ({self.length} token ids, vocabulary {self.vocab})"
        return f"sequence ({self.length} steps x {self.features} features)"


DataShape = TabularShape | ImageShape | SequenceShape


def either(kinds: list[str]) -> str:
    """['image'] -> 'image'; ['tabular', 'image', 'sequence'] -> 'tabular, image or sequence'."""
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
