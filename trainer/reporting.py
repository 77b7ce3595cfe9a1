"""How the trainer talks to whoever runs it: a reporter it calls, errors it raises.

The trainer knows nothing of Celery, SQL or MLflow; the worker passes a reporter
that buffers metrics and answers `should_stop` from a flag set elsewhere.
Every call here must be cheap: they happen inside the training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn


class Reporter(Protocol):
    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def progress(self, epoch: int, step: int) -> None: ...

    def should_stop(self) -> bool: ...

    def save_checkpoint(self, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
        """A checkpoint is offered; call make_state() to take it (live tensors: serialise before returning)."""
        ...


class NullReporter:
    """Runs the trainer with nobody listening (tests, benchmarks)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def progress(self, epoch: int, step: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
        pass


class RecordingReporter(NullReporter):
    """Keeps every metric in memory: {name: [(step, value), ...]}."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.history.setdefault(key, []).append((step, value))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, value: float, lr: float) -> None:
        self.step, self.value, self.lr = step, value, lr
        super().__init__(
            f"diverged at step {step}: train_loss became {value} "
            f"(learning rate {lr:g}; a smaller learning rate or gradient clipping usually helps)"
        )


@dataclass
class TrainingResult:
    model: nn.Module
    steps: int
    epochs: int
    stopped_early: bool  # asked to stop (cancel, timeout, pruning) before the last step or during the end-of-run diagnostics
    final_metrics: dict[str, float]
    confusion_matrix: list[list[int]]
    class_names: list[str]
    # What spec.diagnostics asked for, JSON-ready (the job row keeps it): hessian, per_class,
    # f1_macro, costs_seconds. The landscape's grids go to MLflow only.
    diagnostics: dict[str, Any] = field(default_factory=dict)
    landscape: dict[str, Any] | None = None
    stopped_by: str | None = None  # why a run ended early by its own rule (the range test's explosion)
    exploded_at_step: int | None = None  # the range test: the step whose loss exploded (the run's last counted step)
    exploded_at_lr: float | None = None  # ... and the lr that step trained with
