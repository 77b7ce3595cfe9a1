"""JobSpec validation: defaults, unknown keys and names, bounds, cross-field rules, sizes, params."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.spec import (
    DATASETS,
    OPTIMIZERS,
    SCHEDULES,
    AdamOptimizer,
    ConstantSchedule,
    DigitsDataset,
    JobSpec,
    LossName,
    MLPModel,
    WarmupCosineSchedule,
)

ISSUE_EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "adam-digits.json").read_text())


def errors_of(payload: dict) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(payload)
    return info.value.errors()


def error_fields(payload: dict) -> list[str]:
    """The field each error is about: ctx.field for cross-field errors, else the loc without the union tag."""
    fields = []
    for error in errors_of(payload):
        ctx = error.get("ctx") or {}
        if "field" in ctx:
            fields.append(ctx["field"])
            continue
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] in ("dataset", "model", "optimizer", "schedule"):
            del loc[1]  # ('optimizer', 'sgd', 'lr') -> optimizer.lr
        fields.append(".".join(str(p) for p in loc))
    return fields


# --------------------------------------------------------------------------- defaults


def test_issue_example_validates_and_fills_every_default() -> None:
    spec = JobSpec.model_validate(ISSUE_EXAMPLE)
    dumped = spec.model_dump(mode="json")

    assert dumped["optimizer"] == {
        "name": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-08,
        "weight_decay": 0.0,
        "amsgrad": False,
    }
    assert dumped["schedule"] == {"name": "warmup_cosine", "warmup_steps": 50, "min_lr": 0.0}
    assert dumped["dataset"] == {"name": "digits", "val_fraction": 0.2}
    assert dumped["experiment"] is None
    assert dumped["clip_grad_norm"] is None
    assert spec.loss is LossName.cross_entropy
    # What the database stores validates back to the same spec.
    assert JobSpec.model_validate(dumped) == spec


def test_empty_spec_is_the_documented_default_job() -> None:
    spec = JobSpec()
    assert spec.name == "job"
    assert spec.dataset == DigitsDataset(name="digits", val_fraction=0.2)
    assert spec.model == MLPModel(arch="mlp", hidden=[128, 64], activation="relu", dropout=0.0)
    assert spec.optimizer == AdamOptimizer(name="adam", lr=0.001)
    assert spec.schedule == ConstantSchedule(name="constant")
    assert (spec.epochs, spec.batch_size, spec.seed, spec.device, spec.log_every_steps) == (20, 64, 0, "auto", 1)
    assert JobSpec.model_validate({}) == spec


def test_adamw_default_weight_decay_differs_from_adam() -> None:
    assert JobSpec.model_validate({"optimizer": {"name": "adamw"}}).optimizer.weight_decay == 0.01
    assert JobSpec.model_validate({"optimizer": {"name": "adam"}}).optimizer.weight_decay == 0.0


def test_spec_is_frozen() -> None:
    spec = JobSpec()
    with pytest.raises(ValidationError):
        spec.epochs = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- sizes


def test_digits_split_and_step_arithmetic() -> None:
    spec = JobSpec.model_validate(ISSUE_EXAMPLE)
    # 1797 * 0.2 = 359.4 -> 360 validation samples (rounded up, as scikit-learn does).
    assert spec.split_sizes == (1437, 360)
    assert spec.steps_per_epoch == 23  # ceil(1437 / 64)
    assert spec.total_steps == 20 * 23 == 460


@pytest.mark.parametrize(
    ("dataset", "batch_size", "epochs", "split", "steps_per_epoch"),
    [
        ({"name": "iris", "val_fraction": 0.2}, 16, 3, (120, 30), 8),
        ({"name": "wine", "val_fraction": 0.25}, 32, 2, (133, 45), 5),  # 178 * .25 = 44.5 -> 45
        ({"name": "moons", "n_samples": 101, "val_fraction": 0.1}, 1000, 4, (90, 11), 1),  # full batch
        ({"name": "breast_cancer", "val_fraction": 0.3}, 569, 1, (398, 171), 1),  # 170.7 -> 171
    ],
)
def test_split_sizes_round_validation_up(dataset, batch_size, epochs, split, steps_per_epoch) -> None:  # noqa: ANN001
    spec = JobSpec.model_validate({"dataset": dataset, "batch_size": batch_size, "epochs": epochs})
    assert spec.split_sizes == split
    assert sum(spec.split_sizes) == spec.dataset.n_samples
    assert spec.steps_per_epoch == steps_per_epoch
    assert spec.total_steps == epochs * steps_per_epoch


# --------------------------------------------------------------------------- unknown keys


FOREIGN_FIELD = {
    "sgd": "betas",
    "adagrad": "momentum",
    "rmsprop": "betas",
    "adam": "momentum",
    "adamw": "nesterov",
}


def test_every_optimizer_has_a_foreign_field_case() -> None:
    assert set(FOREIGN_FIELD) == set(OPTIMIZERS)


@pytest.mark.parametrize(("optimizer", "field"), sorted(FOREIGN_FIELD.items()))
def test_optimizer_rejects_another_optimizers_field(optimizer: str, field: str) -> None:
    assert field not in OPTIMIZERS[optimizer].model_fields
    errors = errors_of({"optimizer": {"name": optimizer, field: [0.9, 0.99] if field == "betas" else 0.9}})
    assert [e["type"] for e in errors] == ["extra_forbidden"]
    assert errors[0]["loc"] == ("optimizer", optimizer, field)


@pytest.mark.parametrize(
    "payload",
    [
        {"learning_rate": 0.1},
        {"dataset": {"name": "iris", "n_samples": 10}},  # bundled sets have a fixed size
        {"model": {"arch": "mlp", "layers": [3]}},
        {"schedule": {"name": "constant", "warmup_steps": 3}},
        {"schedule": {"name": "cosine", "gamma": 0.5}},
    ],
)
def test_unknown_keys_are_rejected_not_dropped(payload: dict) -> None:
    assert {e["type"] for e in errors_of(payload)} == {"extra_forbidden"}


# --------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    ("field", "tag", "registry"),
    [
        ("dataset", "name", DATASETS),
        ("model", "arch", {"mlp": None}),
        ("optimizer", "name", OPTIMIZERS),
        ("schedule", "name", SCHEDULES),
    ],
)
def test_unknown_registry_name_is_rejected_listing_the_valid_ones(field: str, tag: str, registry: dict) -> None:
    errors = errors_of({field: {tag: "no-such-thing"}})
    assert len(errors) == 1
    error = errors[0]
    assert error["type"] == "union_tag_invalid"
    assert error["loc"] == (field,)
    for name in registry:
        assert f"'{name}'" in error["ctx"]["expected_tags"]


def test_missing_discriminator_is_rejected() -> None:
    assert [e["type"] for e in errors_of({"optimizer": {"lr": 0.1}})] == ["union_tag_not_found"]


def test_unknown_loss_is_rejected() -> None:
    errors = errors_of({"loss": "hinge"})
    assert errors[0]["loc"] == ("loss",)
    assert "cross_entropy" in errors[0]["msg"] and "mse" in errors[0]["msg"]


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("lr", [0, 0.0, -0.1, -1e-9])
def test_zero_or_negative_lr_is_rejected(optimizer: str, lr: float) -> None:
    assert error_fields({"optimizer": {"name": optimizer, "lr": lr}}) == ["optimizer.lr"]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, "nan", "inf", "Infinity"])
def test_non_finite_lr_is_rejected(optimizer: str, lr: float | str) -> None:
    errors = errors_of({"optimizer": {"name": optimizer, "lr": lr}})
    assert [e["loc"] for e in errors] == [("optimizer", optimizer, "lr")]


def test_non_finite_lr_is_rejected_from_json() -> None:
    # Python's json module (and so a request body) accepts NaN and Infinity tokens.
    for token in ("NaN", "Infinity", "-Infinity", "1e400"):
        with pytest.raises(ValidationError):
            JobSpec.model_validate(json.loads('{"optimizer": {"name": "sgd", "lr": %s}}' % token))


@pytest.mark.parametrize("val_fraction", [0, 0.0, 1, 1.0, 1.5, -0.2])
def test_val_fraction_outside_open_unit_interval_is_rejected(val_fraction: float) -> None:
    assert error_fields({"dataset": {"name": "digits", "val_fraction": val_fraction}}) == ["dataset.val_fraction"]


def test_val_fraction_leaving_a_class_out_of_a_split_is_rejected() -> None:
    # iris has 3 classes: 150 * 0.01 -> 2 validation samples cannot hold one of each.
    errors = errors_of({"dataset": {"name": "iris", "val_fraction": 0.01}})
    assert [e["ctx"]["field"] for e in errors] == ["dataset.val_fraction"]
    assert "at least one sample per class" in errors[0]["msg"]
    assert JobSpec.model_validate({"dataset": {"name": "iris", "val_fraction": 0.02}}).split_sizes == (147, 3)


@pytest.mark.parametrize(
    "payload",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"seed": -1},
        {"seed": 2**32},
        {"log_every_steps": 0},
        {"clip_grad_norm": 0},
        {"device": "tpu"},
        {"device": "cuda:"},
        {"name": ""},
        {"name": "-starts-with-dash"},
        {"name": "x" * 101},
        {"model": {"arch": "mlp", "hidden": [0]}},
        {"model": {"arch": "mlp", "dropout": 1.0}},
        {"model": {"arch": "mlp", "activation": "swish"}},
        {"optimizer": {"name": "sgd", "momentum": 1.0}},
        {"optimizer": {"name": "adam", "betas": [0.9, 1.0]}},
        {"optimizer": {"name": "adam", "betas": [0.9]}},
        {"optimizer": {"name": "adam", "eps": 0}},
        {"optimizer": {"name": "sgd", "weight_decay": -0.1}},
        {"schedule": {"name": "step", "gamma": 0}},
        {"schedule": {"name": "warmup_linear", "warmup_steps": 0}},
        {"schedule": {"name": "cosine", "min_lr": -0.1}},
        {"dataset": {"name": "blobs", "classes": 1}},
        {"dataset": {"name": "moons", "n_samples": 19}},
    ],
)
def test_out_of_bounds_values_are_rejected(payload: dict) -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(payload)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device: str) -> None:
    assert JobSpec.model_validate({"device": device}).device == device


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize("schedule", ["warmup_linear", "warmup_cosine", "inverse_sqrt"])
def test_warmup_as_long_as_the_run_is_rejected(schedule: str) -> None:
    base = {"dataset": {"name": "iris"}, "batch_size": 16, "epochs": 3}  # 3 x 8 = 24 steps
    assert JobSpec.model_validate(base).total_steps == 24

    for warmup in (24, 25, 1000):
        errors = errors_of(base | {"schedule": {"name": schedule, "warmup_steps": warmup}})
        assert [e["ctx"]["field"] for e in errors] == ["schedule.warmup_steps"]
        assert "24 steps" in errors[0]["msg"]
    accepted = JobSpec.model_validate(base | {"schedule": {"name": schedule, "warmup_steps": 23}})
    assert accepted.schedule.warmup_steps == 23


def test_issue_example_warmup_bound_uses_digits_step_count() -> None:
    assert error_fields(ISSUE_EXAMPLE | {"schedule": {"name": "warmup_cosine", "warmup_steps": 460}}) == [
        "schedule.warmup_steps"
    ]
    spec = JobSpec.model_validate(ISSUE_EXAMPLE | {"schedule": {"name": "warmup_cosine", "warmup_steps": 459}})
    assert spec.schedule == WarmupCosineSchedule(name="warmup_cosine", warmup_steps=459, min_lr=0.0)


@pytest.mark.parametrize("schedule", ["cosine", "warmup_linear", "warmup_cosine"])
@pytest.mark.parametrize("min_lr", [0.1, 0.5])
def test_min_lr_not_below_lr_is_rejected(schedule: str, min_lr: float) -> None:
    payload = {"optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"name": schedule, "warmup_steps": 5, "min_lr": min_lr}}
    if schedule == "cosine":
        del payload["schedule"]["warmup_steps"]
    assert error_fields(payload) == ["schedule.min_lr"]
    payload["schedule"]["min_lr"] = 0.0999
    assert JobSpec.model_validate(payload).schedule.min_lr == 0.0999


def test_min_lr_is_checked_against_the_optimizers_default_lr() -> None:
    # adam's default lr is 0.001
    assert error_fields({"schedule": {"name": "cosine", "min_lr": 0.001}}) == ["schedule.min_lr"]


def test_nesterov_without_momentum_is_rejected() -> None:
    errors = errors_of({"optimizer": {"name": "sgd", "nesterov": True}})
    assert [e["ctx"]["field"] for e in errors] == ["optimizer.nesterov"]
    assert "momentum" in errors[0]["msg"]
    spec = JobSpec.model_validate({"optimizer": {"name": "sgd", "nesterov": True, "momentum": 0.9}})
    assert spec.optimizer.nesterov and spec.optimizer.momentum == 0.9


# --------------------------------------------------------------------------- MLflow params


def test_flat_params_are_dotted_strings() -> None:
    flat = JobSpec.model_validate(ISSUE_EXAMPLE).flat_params()

    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert flat["name"] == "adam-digits"
    assert flat["optimizer.name"] == "adam"
    assert flat["optimizer.lr"] == "0.001"
    assert flat["optimizer.amsgrad"] == "False"
    assert flat["schedule.name"] == "warmup_cosine"
    assert flat["schedule.warmup_steps"] == "50"
    assert flat["dataset.val_fraction"] == "0.2"
    assert flat["epochs"] == "20"
    assert json.loads(flat["model.hidden"]) == [128, 64]
    assert json.loads(flat["optimizer.betas"]) == [0.9, 0.999]
    assert flat["clip_grad_norm"] == ""  # None is recorded, as an empty string
    assert not any(isinstance(v, dict) for v in flat.values())
    assert "optimizer" not in flat and "model" not in flat


def test_flat_params_cover_every_leaf_of_the_spec() -> None:
    spec = JobSpec.model_validate(ISSUE_EXAMPLE)
    dumped = spec.model_dump(mode="json")
    expected = {
        f"{outer}.{inner}" if isinstance(value, dict) else outer
        for outer, value in dumped.items()
        for inner in (value if isinstance(value, dict) else [None])
    }
    assert set(spec.flat_params()) == expected
