"""Models and data shapes: every model trains through the recipe on the views it takes,
states its exact size, and a model that cannot read a dataset is a 422 saying why.

Tiny models and few steps throughout: the file runs in seconds on a shared CPU.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from jobs.settings import settings
from jobs.shapes import DataShape, ImageShape, SequenceShape, TabularShape
from jobs.spec import DATASETS, MODELS, JobSpec
from trainer.data import DATASET_LOADERS, load_split
from trainer.models import MODEL_BUILDERS
from trainer.recipe import Trainer, run_training
from trainer.vision import models as vision_models
from trainer.reporting import RecordingReporter

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def job(**overrides) -> JobSpec:  # noqa: ANN003
    base = {"optimizer": {"name": "adam", "lr": 0.01}, "epochs": 1, "batch_size": 64, "seed": 0, "device": "cpu"}
    return JobSpec.model_validate(base | overrides)


# --------------------------------------------------------------------------- sizes


SIZE_CASES = [
    ({"arch": "mlp", "hidden": [16]}, TabularShape(13)),
    ({"arch": "mlp", "hidden": [16, 8]}, ImageShape(1, 8, 8)),
    ({"arch": "mlp", "hidden": []}, SequenceShape(7, vocab=5)),
    ({"arch": "mlp", "hidden": [4]}, SequenceShape(8, features=8)),
    ({"arch": "cnn"}, ImageShape(1, 8, 8)),
    ({"arch": "cnn", "channels": [8], "kernel_size": 5, "hidden": []}, ImageShape(3, 16, 12)),
    ({"arch": "cnn", "channels": [4, 6, 5], "kernel_size": 1, "hidden": [10, 7]}, ImageShape(2, 9, 17)),
    ({"arch": "rnn", "hidden_size": 9}, SequenceShape(30, vocab=8)),
    ({"arch": "rnn", "hidden_size": 5, "num_layers": 3, "bidirectional": True}, SequenceShape(8, features=8)),
    ({"arch": "lstm", "hidden_size": 7, "num_layers": 2}, SequenceShape(12, vocab=3)),
    ({"arch": "lstm", "hidden_size": 4, "bidirectional": True, "pooling": "mean"}, SequenceShape(8, features=6)),
    ({"arch": "gru", "hidden_size": 6, "num_layers": 2, "bidirectional": True}, SequenceShape(5, vocab=11)),
    ({"arch": "gru"}, SequenceShape(8, features=8)),
    ({"arch": "transformer"}, SequenceShape(30, vocab=8)),
    (
        {"arch": "transformer", "d_model": 12, "num_heads": 3, "num_layers": 3, "ff_dim": 20},
        SequenceShape(8, features=8),
    ),
    ({"arch": "transformer", "d_model": 8, "num_heads": 8, "num_layers": 1, "ff_dim": 1}, SequenceShape(2, vocab=2)),
    ({"arch": "resnet", "width": 0.125}, ImageShape(3, 32, 32)),  # CIFAR
    ({"arch": "resnet", "depth": 34, "width": 0.25}, ImageShape(1, 28, 28)),  # MNIST
    ({"arch": "resnet", "width": 0.140625}, ImageShape(1, 8, 8)),  # digits; 9 stem channels
    ({"arch": "resnet", "depth": 34, "width": 0.125}, ImageShape(2, 65, 80)),  # the ImageNet stem
]


@pytest.mark.parametrize(("fields", "shape"), SIZE_CASES, ids=lambda v: str(v))
def test_the_parameter_count_is_the_one_torch_builds(fields: dict, shape: DataShape) -> None:
    spec = MODELS[fields["arch"]].model_validate(fields)
    model = MODEL_BUILDERS[spec.arch](spec, shape, 4)
    assert spec.n_parameters(shape, 4) == sum(p.numel() for p in model.parameters())


def test_every_model_has_a_size_case() -> None:
    assert {fields["arch"] for fields, _ in SIZE_CASES} == set(MODELS)


@pytest.mark.parametrize(("fields", "shape"), SIZE_CASES, ids=lambda v: str(v))
def test_every_model_gives_one_logit_per_class(fields: dict, shape: DataShape) -> None:
    spec = MODELS[fields["arch"]].model_validate(fields)
    model = MODEL_BUILDERS[spec.arch](spec, shape, 4).eval()
    if isinstance(shape, SequenceShape) and shape.tokens:
        x = torch.randint(0, shape.vocab, (3, *shape.dims))  # type: ignore[arg-type]
    else:
        x = torch.randn(3, *shape.dims)
    assert model(x).shape == (3, 4)


# --------------------------------------------------------------------------- views of the data


def test_digits_is_read_as_the_view_each_model_takes() -> None:
    views = {arch: job(model={"arch": arch}).input_shape for arch in MODELS}
    assert views == {
        "mlp": TabularShape(64),  # the flat 64 pixels, as before
        "cnn": ImageShape(1, 8, 8),
        "rnn": SequenceShape(8, features=8),
        "lstm": SequenceShape(8, features=8),
        "gru": SequenceShape(8, features=8),
        "transformer": SequenceShape(8, features=8),
        "resnet": ImageShape(1, 8, 8),
    }


def test_load_split_reshapes_to_the_view_and_standardises_per_feature_axis() -> None:
    flat = load_split(job(model={"arch": "mlp"}), CPU)
    image = load_split(job(model={"arch": "cnn"}), CPU)
    rows = load_split(job(model={"arch": "gru"}), CPU)
    n = len(flat.x_train)
    assert image.x_train.shape == (n, 1, 8, 8) and rows.x_train.shape == (n, 8, 8)
    assert torch.equal(image.y_train, flat.y_train) and torch.equal(rows.y_val, flat.y_val)  # same split
    # Images: one mean and std per channel; sequences: per step feature, over samples and time.
    assert abs(image.x_train.mean().item()) < 1e-4 and abs(image.x_train.std(unbiased=False).item() - 1) < 1e-3
    assert torch.allclose(rows.x_train.mean(dim=(0, 1)), torch.zeros(8), atol=1e-4)
    assert torch.allclose(rows.x_train.std(dim=(0, 1), unbiased=False), torch.ones(8), atol=1e-3)


def test_token_ids_are_not_standardised() -> None:
    spec = job(dataset={"name": "sequence_memory", "n_samples": 200, "length": 9}, model={"arch": "lstm"})
    data = load_split(spec, CPU)
    assert data.shape == SequenceShape(9, vocab=8)
    assert data.x_train.dtype == torch.int64 and data.x_train.shape == (160, 9)
    raw, _, _ = DATASET_LOADERS["sequence_memory"](spec.dataset, spec.seed)
    assert {tuple(row) for row in data.x_val.tolist()} <= {tuple(row) for row in raw.tolist()}


def test_sequence_memory_is_the_first_token_among_distractors() -> None:
    dataset = DATASETS["sequence_memory"](name="sequence_memory", n_samples=101, length=12, classes=3, distractors=5)
    x, y, names = DATASET_LOADERS["sequence_memory"](dataset, 4)
    assert x.shape == (101, 12) and x.dtype == np.int64
    assert np.array_equal(x[:, 0], y)
    assert x[:, 1:].min() >= 3 and x[:, 1:].max() == 7  # distractors never look like a class token
    assert np.bincount(y).tolist() == [34, 34, 33] and names == ["0", "1", "2"]


def test_sequence_parity_is_the_parity_of_the_ones() -> None:
    dataset = DATASETS["sequence_parity"](name="sequence_parity", n_samples=300, length=15)
    x, y, names = DATASET_LOADERS["sequence_parity"](dataset, 4)
    assert x.shape == (300, 15) and set(np.unique(x).tolist()) == {0, 1}
    assert np.array_equal(x.sum(axis=1) % 2, y)
    assert np.bincount(y).tolist() == [150, 150] and names == ["even", "odd"]


@pytest.mark.parametrize("name", ["sequence_memory", "sequence_parity"])
def test_sequence_data_follows_the_seed(name: str) -> None:
    dataset = DATASETS[name](name=name, n_samples=50)
    first, again, other = (DATASET_LOADERS[name](dataset, seed)[0] for seed in (3, 3, 4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


# --------------------------------------------------------------------------- training


MEMORY = {"name": "sequence_memory", "n_samples": 320, "length": 8}
TRAINING_CASES = [
    ({"arch": "cnn", "channels": [4, 8], "hidden": [16]}, {"name": "digits"}),
    ({"arch": "rnn", "hidden_size": 16, "pooling": "mean"}, {"name": "digits"}),
    ({"arch": "lstm", "hidden_size": 16}, MEMORY),
    ({"arch": "gru", "hidden_size": 16, "bidirectional": True}, {"name": "digits"}),
    ({"arch": "transformer", "d_model": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32}, MEMORY),
    ({"arch": "transformer", "d_model": 16, "num_heads": 4, "num_layers": 1, "ff_dim": 32}, {"name": "digits"}),
    ({"arch": "mlp", "hidden": [16]}, MEMORY),
    ({"arch": "resnet", "width": 0.125}, {"name": "digits"}),
]


@pytest.mark.parametrize(("model", "dataset"), TRAINING_CASES, ids=lambda v: str(v))
def test_each_model_trains_through_the_recipe(model: dict, dataset: dict) -> None:
    epochs = 1 if dataset["name"] == "digits" else 10  # 23 steps on digits, 40 on the small memory task
    trainer = Trainer(job(model=model, dataset=dataset, epochs=epochs), RecordingReporter())
    trainer.setup()
    initial_loss, _, _ = trainer.evaluate(trainer.data.x_train, trainer.data.y_train)
    result = trainer.train()
    assert result.steps == trainer.spec.total_steps
    assert result.final_metrics["train_loss"] < 0.9 * initial_loss


def test_last_pooling_reads_the_final_state_of_each_direction() -> None:
    spec = MODELS["gru"](arch="gru", hidden_size=5, num_layers=2, bidirectional=True)
    model = MODEL_BUILDERS["gru"](spec, SequenceShape(6, features=3), 2)
    model.head = nn.Identity()  # the classifier's input, exposed
    x = torch.randn(4, 6, 3)
    outputs, _ = model.rnn(x)
    expected = torch.cat([outputs[:, -1, :5], outputs[:, 0, 5:]], dim=1)  # forward ends last, backward first
    assert torch.allclose(model(x), expected)


def memory_accuracy(arch: str, seed: int) -> float:
    spec = job(
        dataset={"name": "sequence_memory", "length": 30, "n_samples": 1000},
        model={"arch": arch, "hidden_size": 32},
        optimizer={"name": "adam", "lr": 0.003},
        batch_size=32,
        epochs=4,  # 100 steps
        seed=seed,
    )
    trainer = Trainer(spec)
    trainer.setup()
    return trainer.train().final_metrics["val_accuracy"]


def test_an_lstm_remembers_the_first_of_30_tokens_sooner_than_a_plain_rnn() -> None:
    # The course's point, at the T = 30. Measured (seeds 0..5, this budget): rnn
    # 0.24 0.24 0.50 0.26 0.28 0.23, lstm 0.94 0.50 1.00 0.50 0.50 1.00, gru 0.73 0.65 1.00
    # 0.71 1.00 0.50 (chance is 0.25). With more steps the rnn often gets there too
    # (bench/sequence_memory.py): it is slower and less reliable, not unable, at this length.
    seeds = (0, 1, 2)
    rnn = [memory_accuracy("rnn", seed) for seed in seeds]
    lstm = [memory_accuracy("lstm", seed) for seed in seeds]
    assert sum(lstm) / len(seeds) >= sum(rnn) / len(seeds) + 0.2, (rnn, lstm)


@pytest.mark.parametrize(("arch", "gates"), [("lstm", 4), ("gru", 3)])
def test_gated_cells_start_keeping_their_state_over_the_sequence_length(arch: str, gates: int) -> None:
    spec = MODELS[arch](arch=arch, hidden_size=50, num_layers=2, bidirectional=True)
    model = MODEL_BUILDERS[arch](spec, SequenceShape(30, vocab=2), 2)
    for name, bias in model.rnn.named_parameters():
        if name.startswith("bias_ih"):
            blocks = bias.detach().reshape(gates, 50)
            keep = blocks[1]  # LSTM forget gate, GRU update gate
            assert 0 <= keep.min() and keep.max() <= np.log(29) and keep.std() > 0.3, name
            if arch == "lstm":
                assert torch.equal(blocks[0], -keep)  # the input gate starts as closed as the forget gate is open
        if name.startswith("bias_hh"):
            assert torch.all(bias.detach().reshape(gates, 50)[1] == 0), name


# --------------------------------------------------------------------------- 422s at submission


@pytest.mark.parametrize(
    ("payload", "field", "words"),
    [
        ({"dataset": {"name": "iris"}, "model": {"arch": "cnn"}}, "model.arch",
         "cnn takes image data; dataset 'iris' is tabular"),
        ({"dataset": {"name": "wine"}, "model": {"arch": "lstm"}}, "model.arch",
         "lstm takes sequence data; dataset 'wine' is tabular"),
        ({"dataset": {"name": "sequence_parity"}, "model": {"arch": "cnn"}}, "model.arch",
         "cnn takes image data; dataset 'sequence_parity' is sequence (20 token ids, vocabulary 2)"),
        ({"model": {"arch": "transformer", "d_model": 64, "num_heads": 3}}, "model.num_heads",
         "num_heads (3) must divide d_model (64)"),
        ({"model": {"arch": "cnn", "channels": [4, 4, 4, 4]}}, "model.channels", "at least 16x16"),
        ({"model": {"arch": "cnn", "kernel_size": 4}}, "model.kernel_size", "odd"),
        ({"model": {"arch": "gru", "hidden": [16]}}, "model.hidden", "Extra inputs are not permitted"),
        ({"model": {"arch": "rnn", "pooling": "max"}}, "model.pooling", "'last' or 'mean'"),
        ({"dataset": {"name": "iris"}, "model": {"arch": "resnet"}}, "model.arch",
         "resnet takes image data; dataset 'iris' is tabular"),
        ({"model": {"arch": "resnet", "width": 0.3}}, "model.width", "64 x width must be a whole number of channels (got 19.2)"),
        ({"model": {"arch": "resnet", "width": 8.0}}, "model.width", "less than or equal to 4"),
        ({"model": {"arch": "resnet", "width": 0.0625}}, "model.width", "greater than or equal to 0.125"),
        ({"model": {"arch": "resnet", "depth": 50}}, "model.depth", "18 or 34"),
        ({"model": {"arch": "resnet", "depth": "18"}}, "model.depth", "18 or 34"),  # strict: a JSON int
    ],
)
def test_a_model_that_cannot_read_the_data_is_a_422_saying_why(
    client: TestClient, payload: dict, field: str, words: str
) -> None:
    response = client.post("/v1/jobs", json={"epochs": 1} | payload)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == field
    assert words in detail["msg"]


def test_the_parameter_limit_counts_the_new_models(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"epochs": 1, "dataset": {"name": "sequence_memory"}, "model": {"arch": "transformer"}}
    size = JobSpec.model_validate(payload).model.n_parameters(SequenceShape(30, vocab=8), 4)
    monkeypatch.setattr(settings, "max_model_parameters", size - 1)
    response = client.post("/v1/jobs", json=payload)
    assert response.status_code == 422 and "MAX_MODEL_PARAMETERS" in response.text
    assert f"({size:,})" in response.json()["detail"][0]["msg"]


def test_resnet_on_8x8_images_refuses_a_batch_size_that_leaves_a_batch_of_one(client: TestClient) -> None:
    # digits: 1437 training samples; in 4s the last batch is 1 image, whose 1x1 maps at the
    # last stage batch norm cannot normalise (torch raises mid-run: refused at submission).
    response = client.post("/v1/jobs", json={"epochs": 1, "model": {"arch": "resnet"}, "batch_size": 4})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == "batch_size"
    assert "batches of at least 2 samples; batch_size 4 leaves a last batch of 1 of the 1437" in detail["msg"]
    for batch_size in (5, 5000):  # a last batch of 2; one batch of all 1437
        assert job(model={"arch": "resnet"}, batch_size=batch_size).batch_size == batch_size
    assert job(model={"arch": "cnn"}, batch_size=4).batch_size == 4  # the others train on any batch


def test_resnet_refuses_images_smaller_than_8x8(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, X=rng.normal(size=(40, 3, 7, 16)), y=np.arange(40) % 2)
    upload = client.post("/v1/datasets", files={"file": ("small.npz", buffer.getvalue())})
    assert upload.status_code == 201, upload.text
    response = client.post("/v1/jobs", json={"dataset": {"id": upload.json()["id"]}, "model": {"arch": "resnet"}})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == "model.arch"
    assert "at least 8x8; the data is image (3x7x16)" in detail["msg"]


# --------------------------------------------------------------------------- resnet


def resnet(shape: ImageShape, n_classes: int = 10, **fields) -> nn.Module:  # noqa: ANN003
    return MODEL_BUILDERS["resnet"](MODELS["resnet"](arch="resnet", **fields), shape, n_classes)


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(("depth", "reference"), [(18, vision_models.resnet18), (34, vision_models.resnet34)])
def test_resnet_at_width_1_is_torchvisions(depth: int, reference: Callable[..., nn.Module]) -> None:
    theirs = shapes_of(reference(num_classes=10))
    # Images over 64 px get torchvision's own ImageNet stem: the same module, tensor for tensor.
    assert shapes_of(resnet(ImageShape(3, 96, 96), depth=depth)) == theirs
    # Up to 64 px the small-image stem: only the first conv differs (3x3 instead of 7x7).
    small = resnet(ImageShape(3, 32, 32), depth=depth)
    assert shapes_of(small) == theirs | {"conv1.weight": (64, 3, 3, 3)}
    assert (small.conv1.stride, small.conv1.padding, small.conv1.bias) == ((1, 1), (1, 1), None)
    assert isinstance(small.maxpool, nn.Identity)
    assert "layer1.0.downsample.0.weight" not in theirs


def test_resnet_sizes_are_the_published_ones() -> None:
    spec = MODELS["resnet"](arch="resnet")
    assert spec.n_parameters(ImageShape(3, 224, 224), 1000) == 11_689_512  # torchvision's resnet18
    assert spec.n_parameters(ImageShape(3, 32, 32), 10) == 11_173_962  # the CIFAR-10 ResNet-18 of the papers
    assert MODELS["resnet"](arch="resnet", depth=34).n_parameters(ImageShape(3, 224, 224), 1000) == 21_797_672


@pytest.mark.parametrize(
    ("fields", "channels"),
    [({"width": 0.5}, (32, 64, 128, 256)), ({"width": 2}, (128, 256, 512, 1024)), ({"width": 1.5}, (96, 192, 384, 768))],
)
def test_resnet_width_scales_every_stage(fields: dict, channels: tuple[int, ...]) -> None:
    spec = MODELS["resnet"].model_validate({"arch": "resnet"} | fields)  # a JSON int is a width too
    assert spec.channels == channels
    if channels[0] <= 64:  # the wide ones are too slow to build on a shared CPU for this
        model = resnet(ImageShape(1, 28, 28), **fields)
        stages = (model.layer1, model.layer2, model.layer3, model.layer4)
        assert model.conv1.out_channels == channels[0]
        assert [stage[-1].conv2.out_channels for stage in stages] == list(channels)
        assert model.fc.in_features == channels[-1]
        assert model.layer1[0].downsample is None  # the stem's width and size: no shortcut conv


@pytest.mark.parametrize(("shape", "last_map"), [(ImageShape(3, 32, 32), 4), (ImageShape(1, 28, 28), 4),
                                                 (ImageShape(1, 8, 8), 1), (ImageShape(3, 96, 96), 3)])  # fmt: skip
def test_resnet_reads_a_batch_of_images_into_logits(shape: ImageShape, last_map: int) -> None:
    torch.manual_seed(0)
    model = resnet(shape, 10, width=0.125).eval()
    maps = []
    model.layer4.register_forward_hook(lambda module, inputs, output: maps.append(output.shape[-2:]))
    assert model(torch.randn(5, *shape.dims)).shape == (5, 10)
    assert maps == [(last_map, last_map)]  # 32 px: stride 8 (small stem); 96 px: 32 (ImageNet stem)


def test_resnet_on_digits_learns_through_run_training() -> None:
    spec = job(model={"arch": "resnet", "width": 0.125}, epochs=2, batch_size=128, seed=3)
    first, again = RecordingReporter(), RecordingReporter()
    run_training(spec, first)
    run_training(spec, again)
    assert first.history["train_loss"] == again.history["train_loss"]  # the same seed, the same run
    losses = [value for _, value in first.history["train_loss"]]  # 12 steps of 128 images
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


# --------------------------------------------------------------------------- examples


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_is_a_valid_job(path: Path) -> None:
    spec = JobSpec.model_validate(json.loads(path.read_text()))
    assert spec.name == path.stem
