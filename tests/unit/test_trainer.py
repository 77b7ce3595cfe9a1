"""The training recipe on CPU with tiny models and fixed seeds.

The central check: a job's trainer and a plain torch loop written out here end with
bit-identical weights, so the recipe adds nothing to the optimization that the spec
does not ask for (same initial weights, data order, loss, steps and learning rates).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from jobs.spec import JobSpec
from trainer.data import load_split
from trainer.recipe import Trainer, confusion_matrix, run_training
from trainer.reporting import NullReporter, RecordingReporter, TrainingDiverged

CPU = torch.device("cpu")


def job(**overrides) -> JobSpec:  # noqa: ANN003
    base = {
        "name": "unit",
        "dataset": {"name": "iris", "val_fraction": 0.2},
        "model": {"arch": "mlp", "hidden": [16], "activation": "relu", "dropout": 0.0},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "schedule": {"name": "constant"},
        "epochs": 3,
        "batch_size": 16,
        "seed": 0,
        "device": "cpu",
    }
    return JobSpec.model_validate(base | overrides)


def train(spec: JobSpec, reporter=None):  # noqa: ANN001, ANN201
    trainer = Trainer(spec, reporter)
    trainer.setup()
    return trainer, trainer.train()


# --------------------------------------------------------------------------- (a) the exact check


def plain_loop(spec: JobSpec, make_optimizer, make_schedule, max_steps: int | None = None) -> nn.Sequential:  # noqa: ANN001
    """The same training, written with nothing but torch: returns the trained model."""
    data = load_split(spec, CPU)
    n_train = len(data.x_train)
    n_features, n_classes = data.x_train.shape[1], int(data.y_train.max()) + 1

    torch.manual_seed(spec.seed)
    widths = [n_features, *spec.model.hidden]
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths, widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        if spec.model.dropout > 0:
            layers.append(nn.Dropout(spec.model.dropout))
    layers.append(nn.Linear(widths[-1], n_classes))
    model = nn.Sequential(*layers)

    optimizer = make_optimizer(model.parameters())
    schedule = make_schedule(optimizer)
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    step = 0
    for _ in range(spec.epochs):
        order = torch.randperm(n_train, generator=g)
        for start in range(0, n_train, spec.batch_size):
            if step == max_steps:
                return model
            step += 1
            batch = order[start : start + spec.batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model


def assert_bit_identical(trained: nn.Module, reference: nn.Module) -> None:
    trained_params = dict(trained.named_parameters())
    reference_params = dict(reference.named_parameters())
    assert trained_params.keys() == reference_params.keys()
    for name, value in trained_params.items():
        assert torch.equal(value.detach(), reference_params[name].detach()), f"{name} differs"


def test_sgd_momentum_with_warmup_matches_a_plain_torch_loop_bit_for_bit() -> None:
    spec = job(
        dataset={"name": "wine", "val_fraction": 0.2},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        schedule={"name": "warmup_cosine", "warmup_steps": 5, "min_lr": 0.0},
        seed=11,
    )
    total, warmup = spec.total_steps, 5
    assert total == 3 * 9  # 178 samples -> 142 train -> 9 batches of 16

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        p = (s - warmup + 1) / (total - warmup)
        return (1.0 + math.cos(math.pi * p)) / 2.0

    reference = plain_loop(
        spec,
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor),
    )
    _, result = train(spec)

    assert result.steps == total
    assert_bit_identical(result.model, reference)


def test_adam_with_cosine_matches_a_plain_torch_loop_bit_for_bit() -> None:
    spec = job(
        optimizer={"name": "adam", "lr": 0.01},
        schedule={"name": "cosine", "min_lr": 0.0},
        seed=3,
    )
    total = spec.total_steps
    assert total == 3 * 8  # iris: 120 train samples -> 8 batches of 16

    reference = plain_loop(
        spec,
        lambda params: torch.optim.Adam(params, lr=0.01),
        # cosine from lr to min_lr = 0 at the last step: lr(s) = lr * (1 + cos(pi * s / (T - 1))) / 2
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 + math.cos(math.pi * s / (total - 1))) / 2),
    )
    _, result = train(spec)
    assert_bit_identical(result.model, reference)


def test_rmsprop_with_dropout_and_step_schedule_matches_a_plain_torch_loop_bit_for_bit() -> None:
    # Dropout draws from the global torch generator during training: the order of use must match too.
    spec = job(
        model={"arch": "mlp", "hidden": [16, 8], "activation": "relu", "dropout": 0.2},
        optimizer={"name": "rmsprop", "lr": 0.005, "momentum": 0.5},
        schedule={"name": "step", "step_size": 10, "gamma": 0.5},
        batch_size=32,
        seed=5,
    )
    reference = plain_loop(
        spec,
        lambda params: torch.optim.RMSprop(params, lr=0.005, momentum=0.5),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 10)),
    )
    _, result = train(spec)
    assert_bit_identical(result.model, reference)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    spec = job(epochs=1)
    _, first = train(spec)
    _, again = train(spec)
    _, other = train(job(epochs=1, seed=1))
    assert_bit_identical(first.model, again.model)
    assert not torch.equal(first.model[0].weight, other.model[0].weight)


def test_initial_weights_and_data_order_do_not_depend_on_the_optimizer() -> None:
    sgd = Trainer(job(optimizer={"name": "sgd", "lr": 0.1}))
    adam = Trainer(job(optimizer={"name": "adam", "lr": 0.01}, schedule={"name": "cosine"}))
    sgd.setup()
    adam.setup()
    assert_bit_identical(sgd.model, adam.model)
    n = len(sgd.data.x_train)
    assert torch.equal(
        torch.randperm(n, generator=sgd.order_generator), torch.randperm(n, generator=adam.order_generator)
    )


def test_trainer_applies_clipping_when_asked() -> None:
    # With a tiny clip the update is bounded: lr * max_norm per step for plain SGD.
    spec = job(optimizer={"name": "sgd", "lr": 1.0}, clip_grad_norm=1e-3, epochs=1)
    trainer = Trainer(spec)
    trainer.setup()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.train()
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(result.model.parameters(), before)))
    assert 0 < moved.item() <= result.steps * 1e-3 * (1 + 1e-4)


# --------------------------------------------------------------------------- (b) divergence


def test_divergence_raises_with_the_step() -> None:
    spec = job(optimizer={"name": "sgd", "lr": 1e3}, epochs=5)
    reporter = RecordingReporter()
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+") as info:
        train(spec, reporter)

    error = info.value
    assert f"diverged at step {error.step}" in str(error)
    assert not math.isfinite(error.value)
    assert error.lr == 1e3
    assert 0 < error.step < spec.total_steps
    # Every step before the bad one was logged with a finite loss; nothing after it.
    logged = reporter.history["train_loss"]
    assert [s for s, _ in logged] == list(range(error.step))
    assert all(math.isfinite(v) for _, v in logged)


def test_divergence_is_caught_on_steps_that_are_not_logged() -> None:
    every_step = job(optimizer={"name": "sgd", "lr": 1e3}, epochs=5)
    sparse = job(optimizer={"name": "sgd", "lr": 1e3}, epochs=5, log_every_steps=7)
    with pytest.raises(TrainingDiverged) as first:
        train(every_step)
    with pytest.raises(TrainingDiverged) as second:
        train(sparse)
    assert second.value.step == first.value.step


# --------------------------------------------------------------------------- (c) cancellation


class StopAfter(NullReporter):
    """Asks the trainer to stop once `n` steps have been reported."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.progress_calls: list[tuple[int, int]] = []

    def progress(self, epoch: int, step: int) -> None:
        self.progress_calls.append((epoch, step))

    def should_stop(self) -> bool:
        return len(self.progress_calls) >= self.n


@pytest.mark.parametrize("n", [1, 5, 8, 11])
def test_cancel_stops_after_exactly_n_steps(n: int) -> None:
    spec = job(epochs=3)  # 8 steps per epoch
    reporter = StopAfter(n)
    _, result = train(spec, reporter)

    assert result.steps == n
    assert result.stopped_early is True
    assert len(reporter.progress_calls) == n
    assert reporter.progress_calls[-1] == ((n - 1) // 8 + 1, n)
    assert result.epochs == (n - 1) // 8 + 1


def test_cancelled_run_has_the_weights_of_n_steps() -> None:
    spec = job(optimizer={"name": "adam", "lr": 0.01}, epochs=3)
    _, stopped = train(spec, StopAfter(11))
    reference = plain_loop(
        spec,
        lambda params: torch.optim.Adam(params, lr=0.01),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        max_steps=11,
    )
    assert_bit_identical(stopped.model, reference)


def test_stop_request_after_the_last_step_is_not_an_early_stop() -> None:
    # TrainingResult.stopped_early means "asked to stop before the last step"; a request that
    # arrives once every step has run must not turn a finished run into a cancelled one.
    spec = job(epochs=2)
    _, result = train(spec, StopAfter(spec.total_steps))
    assert result.steps == spec.total_steps
    assert result.stopped_early is False


def test_run_without_stop_is_not_stopped_early() -> None:
    result = run_training(job(epochs=2))
    assert result.stopped_early is False
    assert result.steps == job(epochs=2).total_steps
    assert result.epochs == 2


# --------------------------------------------------------------------------- (d) metrics


@pytest.mark.parametrize("k", [1, 3, 5])
def test_metrics_are_logged_every_k_steps_and_every_epoch(k: int) -> None:
    spec = job(
        epochs=3,
        log_every_steps=k,
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        schedule={"name": "warmup_linear", "warmup_steps": 4, "min_lr": 0.001},
    )
    reporter = RecordingReporter()
    _, result = train(spec, reporter)
    history = reporter.history
    total, per_epoch = spec.total_steps, spec.steps_per_epoch

    logged_steps = list(range(0, total, k))
    for name in ("train_loss", "lr", "grad_norm"):
        assert [s for s, _ in history[name]] == logged_steps, name
        assert all(math.isfinite(v) for _, v in history[name]), name
    assert all(v > 0 for _, v in history["grad_norm"])

    epoch_ends = [per_epoch * e for e in range(1, spec.epochs + 1)]
    assert history["epoch"] == [(s, e) for s, e in zip(epoch_ends, range(1, spec.epochs + 1))]
    for name in ("train_accuracy", "val_loss", "val_accuracy"):
        assert [s for s, _ in history[name]] == epoch_ends, name
    assert all(0.0 <= v <= 1.0 for _, v in history["train_accuracy"] + history["val_accuracy"])
    # The last epoch's numbers are the result's.
    assert history["val_accuracy"][-1][1] == result.final_metrics["val_accuracy"]
    assert history["val_loss"][-1][1] == pytest.approx(result.final_metrics["val_loss"], rel=1e-6)

    # lr history follows the warm-up + linear decay closed form.
    def lr_at(s: int) -> float:
        if s < 4:
            return 0.1 * (s + 1) / 4
        return 0.1 + (0.001 - 0.1) * (s - 4 + 1) / (total - 4)

    for s, value in history["lr"]:
        assert math.isclose(value, lr_at(s), rel_tol=1e-6), (s, value)


def test_logged_train_loss_is_the_batch_loss() -> None:
    # Step 0's loss is the loss of the first mini-batch with the initial weights.
    spec = job(log_every_steps=1)
    reporter = RecordingReporter()
    trainer = Trainer(spec, reporter)
    trainer.setup()
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    first_batch = torch.randperm(len(trainer.data.x_train), generator=torch.Generator().manual_seed(spec.seed))[:16]
    trainer.train()

    model = trainer.model
    with torch.no_grad():
        for p, value in zip(model.parameters(), initial):
            p.copy_(value)
        expected = nn.functional.cross_entropy(model(trainer.data.x_train[first_batch]), trainer.data.y_train[first_batch])
    assert reporter.history["train_loss"][0] == (0, pytest.approx(expected.item(), rel=1e-6))


# --------------------------------------------------------------------------- (e) mse, confusion matrix


def test_mse_loss_trains_and_the_confusion_matrix_covers_the_validation_split() -> None:
    spec = job(
        dataset={"name": "blobs", "n_samples": 300, "classes": 3, "noise": 1.0, "val_fraction": 0.2},
        loss="mse",
        optimizer={"name": "adam", "lr": 0.01},
        epochs=5,
    )
    reporter = RecordingReporter()
    _, result = train(spec, reporter)

    losses = [v for _, v in reporter.history["train_loss"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    val_losses = [v for _, v in reporter.history["val_loss"]]
    assert val_losses[-1] < val_losses[0]

    matrix = result.confusion_matrix
    n_val = spec.split_sizes[1]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert sum(map(sum, matrix)) == n_val
    assert [sum(row) for row in matrix] == torch.bincount(load_split(spec, CPU).y_val, minlength=3).tolist()
    assert sum(matrix[i][i] for i in range(3)) / n_val == pytest.approx(result.final_metrics["val_accuracy"])
    assert result.class_names == ["0", "1", "2"]


def test_confusion_matrix_rows_are_true_classes() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(labels, predicted, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


# --------------------------------------------------------------------------- (f) it learns


def test_reaches_high_validation_accuracy_on_iris() -> None:
    spec = job(optimizer={"name": "adam", "lr": 0.05}, epochs=8)
    _, result = train(spec)
    assert result.final_metrics["val_accuracy"] > 0.9
    assert result.final_metrics["train_accuracy"] > 0.9
    assert result.final_metrics["val_loss"] < 0.5


def test_reaches_high_validation_accuracy_on_blobs() -> None:
    spec = job(
        dataset={"name": "blobs", "n_samples": 400, "classes": 3, "noise": 0.5},
        optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        epochs=3,
    )
    _, result = train(spec)
    assert result.final_metrics["val_accuracy"] > 0.9


# --------------------------------------------------------------------------- construction


def test_largest_seed_runs() -> None:
    spec = job(seed=2**32 - 1, epochs=1, dataset={"name": "spirals", "n_samples": 60})
    result = run_training(spec)
    assert result.steps == spec.total_steps



def test_device_resolution() -> None:
    if torch.cuda.is_available():
        assert Trainer(job(device="auto")).device.type == "cuda"
        return
    assert Trainer(job(device="auto")).device == CPU
    # A CUDA request on a machine without one is refused at construction, before any data is loaded.
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(job(device="cuda"))
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(job(device="cuda:1"))
