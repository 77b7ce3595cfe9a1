"""One registry per concept: every spec name has exactly one trainer factory and the
catalog (what GET /v1/catalog serves) shows every name with its fields, defaults and bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from jobs.catalog import build_catalog
from jobs.spec import (
    DATASETS,
    LOSS_DESCRIPTIONS,
    MODELS,
    OPTIMIZERS,
    SCHEDULES,
    TAGGED_FIELDS,
    BundledDataset,
    ImageDataset,
    JobSpec,
    LossName,
    MLPModel,
)
from trainer.data import DATASET_LOADERS, IMAGE_LOADERS, load_split
from trainer.losses import LOSS_FUNCTIONS
from trainer.models import MODEL_BUILDERS
from trainer.optim import OPTIMIZER_BUILDERS
from trainer.schedules import SCHEDULE_BUILDERS

PAIRS = {
    "datasets": (DATASETS, DATASET_LOADERS | IMAGE_LOADERS),  # generated or bundled | read from the cache
    "models": (MODELS, MODEL_BUILDERS),
    "optimizers": (OPTIMIZERS, OPTIMIZER_BUILDERS),
    "schedules": (SCHEDULES, SCHEDULE_BUILDERS),
    "losses": ({str(n): n for n in LossName}, LOSS_FUNCTIONS),
}
PLURAL = {"dataset": "datasets", "model": "models", "optimizer": "optimizers", "schedule": "schedules"}


# --------------------------------------------------------------------------- spec <-> trainer


@pytest.mark.parametrize("concept", sorted(PAIRS))
def test_every_spec_name_has_exactly_one_trainer_factory_and_vice_versa(concept: str) -> None:
    spec_names, factories = PAIRS[concept]
    assert list(spec_names), f"the spec registry of {concept} is empty"
    assert sorted(spec_names) == sorted(factories)
    assert len(set(spec_names)) == len(list(spec_names))
    assert all(callable(f) for f in factories.values())


def test_a_dataset_is_generated_or_read_from_the_cache_never_both() -> None:
    assert not set(DATASET_LOADERS) & set(IMAGE_LOADERS)
    assert sorted(IMAGE_LOADERS) == sorted(n for n, cls in DATASETS.items() if issubclass(cls, ImageDataset))


def test_model_registry_holds_every_model() -> None:
    # MODELS is derived from the `ModelSpec` union; an arch JobSpec accepts must be in it.
    assert JobSpec.model_validate({"model": {"arch": "mlp"}}).model.arch == "mlp"
    assert MODELS["mlp"] is MLPModel
    assert list(MODELS) == ["mlp", "cnn", "rnn", "lstm", "gru", "transformer", "resnet"]


def test_tagged_fields_point_at_the_spec_registries() -> None:
    assert TAGGED_FIELDS == {
        "dataset": ("name", DATASETS),
        "model": ("arch", MODELS),
        "optimizer": ("name", OPTIMIZERS),
        "schedule": ("name", SCHEDULES),
    }
    for field, (tag, registry) in TAGGED_FIELDS.items():
        for name, cls in registry.items():
            # The registry key is the literal the class accepts as its tag.
            assert cls.model_fields[tag].annotation.__args__ == (name,)
            assert getattr(JobSpec.model_validate({field: {tag: name}}), field).__class__ is cls


def test_every_loss_has_a_description() -> None:
    assert set(LOSS_DESCRIPTIONS) == set(LossName)


# --------------------------------------------------------------------------- catalog


@pytest.fixture(scope="module")
def catalog() -> dict:
    return build_catalog()


def test_catalog_is_json(catalog: dict) -> None:
    assert json.loads(json.dumps(catalog)) == catalog


@pytest.mark.parametrize("field", sorted(TAGGED_FIELDS))
def test_catalog_lists_every_registered_name_with_its_fields(catalog: dict, field: str) -> None:
    tag, registry = TAGGED_FIELDS[field]
    spec_names = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}[field]
    entries = catalog[PLURAL[field]]
    # Every name JobSpec accepts (not just what the registry happens to hold) is listed once.
    assert [e["name"] for e in entries] == list(spec_names)
    for entry in entries:
        cls = registry[entry["name"]]
        assert entry["description"] == cls.__doc__.strip()
        assert tag not in entry["fields"], f"the discriminator '{tag}' is listed as a field of {entry['name']}"
        assert set(entry["fields"]) == set(cls.model_fields) - {tag}
        defaults = cls(**{tag: entry["name"]}).model_dump(mode="json")
        for name, schema in entry["fields"].items():
            assert "title" not in schema
            assert "default" in schema, f"the catalog shows no default for {entry['name']}.{name}"
            assert schema["default"] == defaults[name], f"{entry['name']}.{name}"


def test_catalog_shows_bounds(catalog: dict) -> None:
    optimizers = {e["name"]: e["fields"] for e in catalog["optimizers"]}
    assert optimizers["sgd"]["lr"]["default"] == 0.01
    assert optimizers["sgd"]["lr"]["exclusiveMinimum"] == 0
    assert optimizers["sgd"]["momentum"]["minimum"] == 0
    assert optimizers["sgd"]["momentum"]["exclusiveMaximum"] == 1
    assert optimizers["adam"]["lr"]["default"] == 0.001
    assert optimizers["adam"]["betas"]["default"] == [0.9, 0.999]
    assert optimizers["adamw"]["weight_decay"]["default"] == 0.01
    for fields in optimizers.values():
        assert fields["lr"]["exclusiveMinimum"] == 0

    datasets = {e["name"]: e["fields"] for e in catalog["datasets"]}
    assert datasets["digits"]["val_fraction"] == {
        "default": 0.2,
        "description": "Fraction of the samples held out for validation (stratified).",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1,
        "type": "number",
    }
    assert datasets["blobs"]["noise"]["default"] == 1.0  # overrides the synthetic default of 0.1
    assert datasets["moons"]["n_samples"]["minimum"] == 20

    schedules = {e["name"]: e["fields"] for e in catalog["schedules"]}
    assert schedules["constant"] == {}
    assert schedules["warmup_cosine"]["warmup_steps"]["minimum"] == 1
    assert schedules["cosine"]["min_lr"]["minimum"] == 0


def test_catalog_shows_model_fields(catalog: dict) -> None:
    models = {e["name"]: e["fields"] for e in catalog["models"]}
    assert set(models) == set(MODELS)
    assert models["mlp"]["hidden"].get("default") == [128, 64]
    assert models["mlp"]["hidden"]["items"] == {"minimum": 1, "maximum": 8192, "type": "integer"}
    assert set(models["mlp"]["activation"]["enum"]) == {"relu", "tanh", "gelu", "sigmoid", "leaky_relu", "elu"}
    assert models["mlp"]["dropout"]["exclusiveMaximum"] == 1
    assert models["cnn"]["channels"]["default"] == [16, 32]
    assert models["lstm"]["pooling"]["enum"] == ["last", "mean"]
    assert models["transformer"]["num_heads"]["default"] == 4
    assert (models["resnet"]["depth"]["enum"], models["resnet"]["depth"]["default"]) == ([18, 34], 18)
    assert (models["resnet"]["width"]["minimum"], models["resnet"]["width"]["maximum"]) == (0.125, 4)


def test_catalog_says_which_data_each_model_takes_and_each_dataset_is(catalog: dict) -> None:
    takes = {e["name"]: e["takes"] for e in catalog["models"]}
    assert takes["cnn"] == takes["resnet"] == ["image"] and takes["gru"] == ["sequence"] and takes["transformer"] == ["sequence"]
    assert takes["mlp"] == ["tabular", "image", "sequence"]  # read flat
    shapes = {e["name"]: e["shapes"] for e in catalog["datasets"]}
    assert shapes["iris"] == ["tabular (4 features)"]
    assert shapes["digits"] == ["tabular (64 features)", "image (1x8x8)", "sequence (8 steps x 8 features)"]
    assert shapes["sequence_memory"] == ["sequence (30 token ids, vocabulary 8)"]


def test_catalog_losses_and_job(catalog: dict) -> None:
    assert [e["name"] for e in catalog["losses"]] == [str(n) for n in LossName]
    assert all(e["description"] for e in catalog["losses"])

    job = catalog["job"]
    assert set(job["fields"]) == set(JobSpec.model_fields) - set(TAGGED_FIELDS) - {"loss"}
    defaults = JobSpec().model_dump(mode="json")
    for name, schema in job["fields"].items():
        assert "default" in schema, f"the catalog shows no default for job field {name}"
        assert schema["default"] == defaults[name], name
    assert job["fields"]["epochs"]["default"] == 20
    assert job["fields"]["epochs"]["minimum"] == 1
    # The example is a complete, valid job.
    assert JobSpec.model_validate(job["example"]) == JobSpec()


# --------------------------------------------------------------------------- dataset loaders


def dataset_specs() -> list:
    specs = [cls(name=name) for name, cls in DATASETS.items() if name in DATASET_LOADERS]
    specs += [
        DATASETS["blobs"](name="blobs", classes=5, features=7, n_samples=250),
        DATASETS["spirals"](name="spirals", arms=4, n_samples=200),
        DATASETS["moons"](name="moons", n_samples=60),
        DATASETS["sequence_memory"](name="sequence_memory", length=5, classes=7, n_samples=70),
    ]
    return specs


@pytest.mark.parametrize("dataset", dataset_specs(), ids=lambda d: repr(d))
def test_loader_output_matches_the_spec(dataset) -> None:  # noqa: ANN001
    x, y, class_names = DATASET_LOADERS[dataset.name](dataset, 7)

    # Every view of the dataset is a reshape of the loader's columns.
    assert {math.prod(view.dims) for view in dataset.views} == {x.shape[1]}
    assert x.dtype == (np.int64 if dataset.views[0].tokens else np.float32) and y.dtype == np.int64
    assert x.ndim == 2 and y.shape == (len(x),)
    assert len(x) == dataset.n_samples
    assert sorted(set(y.tolist())) == list(range(dataset.n_classes))
    assert len(class_names) == dataset.n_classes
    assert np.isfinite(x).all()
    if isinstance(dataset, BundledDataset):
        assert x.shape == (dataset.SIZE, dataset.FEATURES)
        assert dataset.n_classes == dataset.CLASSES
    elif dataset.name == "blobs":
        assert x.shape[1] == dataset.features
    elif dataset.views[0].tokens:
        assert x.shape[1] == dataset.length and 0 <= x.min() and x.max() < dataset.vocab
    else:
        assert x.shape[1] == 2


@pytest.mark.parametrize("name", sorted(IMAGE_LOADERS))
def test_image_loader_output_matches_the_spec(name: str, image_cache) -> None:  # noqa: ANN001
    dataset = DATASETS[name](name=name)
    arrays = IMAGE_LOADERS[name](image_cache)
    for x, y in ((arrays.x_train, arrays.y_train), (arrays.x_test, arrays.y_test)):
        assert x.dtype == np.uint8 and x.shape[1:] == dataset.image.dims and y.dtype == np.int64
        assert y.shape == (len(x),) and sorted(set(y.tolist())) == list(range(dataset.n_classes))
    # Every view of the dataset is a reshape of the stored image.
    assert {math.prod(view.dims) for view in dataset.views} == {dataset.n_features}
    assert len(arrays.classes) == dataset.n_classes


@pytest.mark.parametrize("name", ["moons", "blobs", "spirals"])
def test_synthetic_data_follows_the_seed(name: str) -> None:
    dataset = DATASETS[name](name=name, n_samples=100)
    loader = DATASET_LOADERS[name]
    x1, y1, _ = loader(dataset, 3)
    x2, y2, _ = loader(dataset, 3)
    x3, _, _ = loader(dataset, 4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


@pytest.mark.parametrize(
    "dataset",
    [
        {"name": "wine", "val_fraction": 0.25},
        {"name": "breast_cancer", "val_fraction": 0.3},
        {"name": "blobs", "classes": 4, "features": 3, "n_samples": 203, "val_fraction": 0.15},
        {"name": "spirals", "arms": 3, "n_samples": 90},
    ],
)
def test_load_split_matches_split_sizes_and_standardises(dataset: dict) -> None:
    spec = JobSpec.model_validate({"dataset": dataset, "seed": 5})
    data = load_split(spec, torch.device("cpu"))
    n_train, n_val = spec.split_sizes

    assert data.x_train.shape[0] == n_train and data.y_train.shape == (n_train,)
    assert data.x_val.shape[0] == n_val and data.y_val.shape == (n_val,)
    assert data.n_classes == spec.dataset.n_classes
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    # Stratified: every class on both sides.
    assert set(data.y_train.tolist()) == set(range(data.n_classes)) == set(data.y_val.tolist())
    # Standardised with the training split's statistics.
    assert torch.allclose(data.x_train.mean(dim=0), torch.zeros(data.n_features), atol=1e-4)
    assert torch.allclose(data.x_train.std(dim=0, unbiased=False), torch.ones(data.n_features), atol=1e-3)


def test_constant_features_stay_finite_after_standardising() -> None:
    # digits has blank border pixels (std 0); they must not become NaN.
    data = load_split(JobSpec.model_validate({"dataset": {"name": "digits"}}), torch.device("cpu"))
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_val).all()
    assert data.n_features == 64
