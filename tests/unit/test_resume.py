"""Exact resume: a run stopped anywhere and continued from its checkpoint ends with the
same weights, bit for bit, and reports the same metrics as a run never stopped."""

from __future__ import annotations

import pytest
import torch

from jobs.spec import JobSpec
from trainer.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from trainer.recipe import Trainer
from trainer.reporting import RecordingReporter

CPU = torch.device("cpu")


class CheckpointingReporter(RecordingReporter):
    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: dict[int, bytes] = {}

    def save_checkpoint(self, step: int, make_state) -> None:  # noqa: ANN001
        self.checkpoints[step] = checkpoint_to_bytes(make_state())


def spec(**overrides) -> JobSpec:
    base = {
        "dataset": {"name": "wine"},
        "model": {"arch": "mlp", "hidden": [16, 8], "dropout": 0.2},  # dropout: the torch RNG matters
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},  # momentum: optimizer state matters
        "schedule": {"name": "warmup_cosine", "warmup_steps": 5},  # schedule state matters
        "epochs": 4,
        "batch_size": 16,
        "seed": 3,
    }
    return JobSpec.model_validate(base | overrides)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def run(job: JobSpec, every: int | None, reporter=None, resume: bytes | None = None) -> tuple[Trainer, object]:  # noqa: ANN001
    trainer = Trainer(job, reporter or CheckpointingReporter(), checkpoint_every_steps=every)
    trainer.setup()
    if resume is not None:
        trainer.load_state_dict(checkpoint_from_bytes(resume, CPU))
    return trainer, trainer.train()


# One per kind of state a model carries: batch norm's running statistics (cnn), a
# recurrent cell with dropout between layers (lstm), attention with dropout (transformer).
OTHER_MODELS = {
    "cnn": spec(
        dataset={"name": "digits", "val_fraction": 0.5},
        model={"arch": "cnn", "channels": [4, 8], "hidden": [16], "dropout": 0.2},
        batch_size=225,  # 4 steps an epoch: checkpoints mid-epoch (3, 6) and at epoch ends (4, 8)
        epochs=2,
    ),
    "lstm": spec(
        dataset={"name": "sequence_memory", "n_samples": 150, "length": 10},
        model={"arch": "lstm", "hidden_size": 8, "num_layers": 2, "dropout": 0.2},
        batch_size=30,
        epochs=2,
    ),
    "transformer": spec(
        dataset={"name": "sequence_parity", "n_samples": 150, "length": 8},
        model={"arch": "transformer", "d_model": 8, "num_heads": 2, "num_layers": 1, "ff_dim": 16, "dropout": 0.1},
        batch_size=30,
        epochs=2,
    ),
}


@pytest.mark.parametrize(
    "job",
    [
        spec(),
        spec(optimizer={"name": "adam", "lr": 0.01}, schedule={"name": "step", "step_size": 4, "gamma": 0.5}),
        *OTHER_MODELS.values(),
    ],
    ids=["mlp-sgd", "mlp-adam", *OTHER_MODELS],
)
def test_resume_from_any_checkpoint_equals_never_stopping(job: JobSpec) -> None:
    straight_reporter = CheckpointingReporter()
    straight, result = run(job, every=3, reporter=straight_reporter)
    expected = weights(straight)
    steps_per_epoch = job.steps_per_epoch  # 9 for wine with batch 16
    # Mid-epoch checkpoints (3, 6, 12, ...) and epoch ends (9, 18, ...) alike.
    assert {3, 6, steps_per_epoch, 2 * steps_per_epoch} <= set(straight_reporter.checkpoints)

    for at, blob in straight_reporter.checkpoints.items():
        if at >= job.total_steps:
            continue
        resumed_reporter = CheckpointingReporter()
        resumed, resumed_result = run(job, every=3, reporter=resumed_reporter, resume=blob)
        for name, tensor in weights(resumed).items():
            assert torch.equal(tensor, expected[name]), f"resumed at step {at}: {name} differs"
        assert resumed_result.final_metrics == result.final_metrics
        # The resumed run reports exactly the steps after the checkpoint, with the same values.
        for key in ("train_loss", "lr", "grad_norm"):
            after = [(s, v) for s, v in straight_reporter.history[key] if s >= at]
            assert resumed_reporter.history[key] == after, (at, key)
        straight_epochs = [(s, v) for s, v in straight_reporter.history["val_accuracy"] if s > at]
        assert resumed_reporter.history["val_accuracy"][-len(straight_epochs):] == straight_epochs


def test_checkpoints_come_at_the_interval_and_every_epoch_end() -> None:
    job = spec()
    reporter = CheckpointingReporter()
    run(job, every=4, reporter=reporter)
    n = job.steps_per_epoch
    epoch_ends = {n * e for e in range(1, job.epochs + 1)}
    interval = {s for s in range(4, job.total_steps, 4) if s % n != 0}
    assert set(reporter.checkpoints) == epoch_ends | interval


def test_a_checkpoint_from_another_format_is_refused() -> None:
    trainer = Trainer(spec())
    trainer.setup()
    state = trainer.state_dict() | {"format": 99}
    with pytest.raises(ValueError, match="format"):
        trainer.load_state_dict(state)
