"""The standard image sets through the trainer: read from a dataset cache (small files in the
real formats, tests/dataset_files.py), split (official test split, stratified hold-out,
stratified subset), kept on the device as uint8 and turned into the model's view per batch,
augmented per training sample from a generator of the job's own, and resumed exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jobs.spec import Augment, Cutout, JobSpec, RandomCrop
from trainer.augment import BatchAugmentation
from trainer.checkpoint import checkpoint_from_bytes, checkpoint_to_bytes
from trainer.data import IMAGE_LOADERS, channel_statistics, load_split, stratified_choice
from trainer.recipe import Trainer, run_training
from trainer.reporting import RecordingReporter

from tests.unit.test_resume import CheckpointingReporter

CPU = torch.device("cpu")
MNIST_FAMILY = ("mnist", "fashion_mnist", "kmnist")
ALL_AUGMENTATIONS = {"random_crop": {"padding": 4}, "horizontal_flip": True, "cutout": {"size": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def job(dataset: dict, **overrides) -> JobSpec:  # noqa: ANN003
    base = {
        "dataset": dataset,
        "model": {"arch": "mlp", "hidden": [32]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "epochs": 1,
        "batch_size": 32,
        "seed": 0,
        "device": "cpu",
    }
    return JobSpec.model_validate(base | overrides)


# --------------------------------------------------------------------------- reading and splitting

SPLITS = [
    {},  # validation "test": the official test split
    {"validation": 0.2},
    {"val_fraction": 0.25, "subset": 150},
    {"subset": 120},
]


@pytest.mark.usefixtures("image_sizes")
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: str(s) or "test")
@pytest.mark.parametrize("name", sorted(IMAGE_LOADERS))
def test_every_image_set_loads_as_stored_uint8_in_the_spec_split_sizes(
    image_cache: Path, name: str, split: dict
) -> None:
    spec = job({"name": name} | split)
    data = load_split(spec, CPU, datasets_dir=image_cache)
    n_train, n_val = spec.split_sizes  # the spec's classes sized as the test files
    dims = spec.dataset.image.dims
    assert data.x_train.shape == (n_train, *dims) and data.x_val.shape == (n_val, *dims)
    assert data.x_train.dtype == data.x_val.dtype == torch.uint8
    assert data.y_train.shape == (n_train,) and data.y_val.shape == (n_val,)
    assert data.y_train.dtype == data.y_val.dtype == torch.int64
    assert data.n_classes == spec.dataset.n_classes and data.n_features == spec.dataset.n_features
    # Stratified: every class in each split.
    assert set(data.y_train.tolist()) == set(range(data.n_classes)) == set(data.y_val.tolist())


def test_the_official_sizes_give_the_spec_sizes() -> None:
    # The spec and the trainer share one rule; with the files' real sizes it is split_sizes.
    for dataset in [{"name": "mnist"}, {"name": "cifar10", "validation": 0.1, "subset": 5000}]:
        spec = job(dataset).dataset
        assert spec.sizes_of(spec.TRAIN, spec.TEST) == spec.split_sizes
    assert job({"name": "cifar10", "validation": 0.1, "subset": 5000}).split_sizes == (5000, 5000)


def test_the_test_split_validates_as_the_files_hold_it(image_cache: Path) -> None:
    from trainer.image_sets import read_image_set

    arrays = read_image_set("cifar10", image_cache)
    data = load_split(job({"name": "cifar10"}), CPU, datasets_dir=image_cache)
    assert np.array_equal(data.x_val.numpy(), arrays.x_test) and np.array_equal(data.y_val.numpy(), arrays.y_test)
    assert np.array_equal(data.x_train.numpy(), arrays.x_train)
    assert data.class_names == arrays.classes


def test_the_hold_out_is_stratified_seeded_and_stays_put_when_the_subset_changes(image_cache: Path) -> None:
    def split(seed: int, subset: int | None) -> tuple:
        data = load_split(job({"name": "mnist", "validation": 0.2, "subset": subset}, seed=seed), CPU,
                          datasets_dir=image_cache)  # fmt: skip
        return data.x_train, data.y_train, data.x_val, data.y_val

    x_train, y_train, x_val, y_val = split(3, None)
    # Held out of the training split, disjoint from what trains.
    train_rows = {bytes(row) for row in x_train.reshape(len(x_train), -1).numpy()}
    assert not train_rows & {bytes(row) for row in x_val.reshape(len(x_val), -1).numpy()}
    # Each class's share of the hold-out is its share of the training split, to within one sample.
    counts = np.bincount(np.concatenate([y_train.numpy(), y_val.numpy()]), minlength=10)
    assert np.all(np.abs(np.bincount(y_val.numpy(), minlength=10) - counts * 0.2) < 1)

    again = split(3, None)
    assert all(torch.equal(a, b) for a, b in zip((x_train, y_train, x_val, y_val), again))
    small, large = split(3, 40), split(3, 120)
    assert torch.equal(small[2], x_val) and torch.equal(large[2], x_val)  # learning curves: one validation set
    assert len(small[0]) == 40 and len(large[0]) == 120
    assert not torch.equal(split(4, None)[2], x_val)  # another seed, another hold-out


def test_a_stratified_choice_keeps_each_class_share_and_every_class() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    picked = stratified_choice(labels, 20, np.random.default_rng(0))
    assert len(picked) == 20 == len(set(picked.tolist()))
    assert np.bincount(labels[picked]).tolist() == [10, 6, 3, 1]
    rare = stratified_choice(np.repeat(np.arange(3), [98, 1, 1]), 3, np.random.default_rng(0))
    assert sorted(np.repeat(np.arange(3), [98, 1, 1])[rare].tolist()) == [0, 1, 2]


def test_without_a_cache_the_image_sets_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="datasets_dir"):
        load_split(job({"name": "mnist"}), CPU)
    with pytest.raises(RuntimeError):
        load_split(job({"name": "mnist"}), CPU, datasets_dir=tmp_path)


# --------------------------------------------------------------------------- the model's view


@pytest.mark.parametrize(
    ("name", "model", "view"),
    [
        ("mnist", {"arch": "mlp"}, (784,)),
        ("fashion_mnist", {"arch": "cnn", "channels": [4]}, (1, 28, 28)),
        ("kmnist", {"arch": "gru", "hidden_size": 8}, (28, 28)),
        ("cifar10", {"arch": "mlp"}, (3072,)),
        ("cifar100", {"arch": "cnn", "channels": [4]}, (3, 32, 32)),
    ],
)
def test_stored_images_become_the_view_the_model_reads_standardised_per_channel(
    image_cache: Path, name: str, model: dict, view: tuple
) -> None:
    spec = job({"name": name}, model=model)
    data = load_split(spec, CPU, datasets_dir=image_cache)
    train, val = data.inputs(data.x_train), data.inputs(data.x_val)
    assert train.shape == (len(data.x_train), *view) and train.dtype == torch.float32
    assert val.shape == (len(data.x_val), *view)
    # The training samples' statistics, per channel, applied to both splits.
    pixels = data.x_train.double() / 255
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    channels = train.reshape(data.x_train.shape)
    assert torch.allclose(channels.mean(dim=(0, 2, 3)), torch.zeros(spec.dataset.CHANNELS), atol=1e-4)
    assert torch.allclose(channels.std(dim=(0, 2, 3), unbiased=False), torch.ones(spec.dataset.CHANNELS), atol=1e-4)
    expected_val = ((data.x_val.double() / 255 - mean) / std).float().reshape(val.shape)
    assert torch.allclose(val, expected_val, atol=1e-5)


def test_channel_statistics_are_exact_without_a_float_copy() -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(1000, 3, 5, 7), dtype=np.uint8)
    x[:, 2] = 7  # a constant channel keeps std 1 (it stays at 0)
    mean, std = channel_statistics(x, chunk=64)  # several chunks
    pixels = x.astype(np.float64) / 255
    assert np.allclose(mean.ravel(), pixels.mean(axis=(0, 2, 3)), rtol=1e-6)
    assert np.allclose(std.ravel()[:2], pixels.std(axis=(0, 2, 3))[:2], rtol=1e-6) and std.ravel()[2] == 1.0


def test_toy_sets_are_stored_as_the_model_reads_them() -> None:
    data = load_split(job({"name": "digits"}), CPU)
    assert data.images is None and data.x_train.dtype == torch.float32
    assert data.inputs(data.x_train) is data.x_train and data.training_inputs(data.x_val, None) is data.x_val


# --------------------------------------------------------------------------- augmentation


def distinct_images(n: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with no zero pixel: a zero in the output came from the padding."""
    return torch.randint(1, 256, (n, channels, side, side), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def test_random_crop_shifts_each_sample_within_the_zero_padding() -> None:
    x = distinct_images(64, 2, 8)
    augmentation = BatchAugmentation(Augment(random_crop=RandomCrop(padding=2)), CPU, seed=0)
    out = augmentation.pixels(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])]
        assert len(found) == 1, i  # each sample is its padded image, cropped at one offset
        offsets.append(found[0])
    assert len(set(offsets)) > 10  # per sample, not one offset for the batch
    assert any(dy != 2 or dx != 2 for dy, dx in offsets) and (out == 0).any()  # black borders come in


def test_horizontal_flip_mirrors_about_half_the_samples() -> None:
    x = distinct_images(400, 3, 6)
    out = BatchAugmentation(Augment(horizontal_flip=True), CPU, seed=0).pixels(x)
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    assert bool((same ^ mirrored).all())  # each sample: as it was, or mirrored left-right
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_cutout_zeroes_one_square_per_sample_clipped_at_the_border() -> None:
    x = torch.ones(300, 3, 16, 16)
    out = BatchAugmentation(Augment(cutout=Cutout(size=5)), CPU, seed=0).normalised(x)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # every channel alike
    mask = zero[:, 0]
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])  # a rectangle
    heights, widths = rows.sum(dim=1), cols.sum(dim=1)
    assert heights.min() >= 3 and widths.min() >= 3 and heights.max() <= 5 and widths.max() <= 5
    inside = (rows[:, 0] == 0) & (rows[:, -1] == 0) & (cols[:, 0] == 0) & (cols[:, -1] == 0)
    assert bool(((heights == 5) & (widths == 5))[inside].all()) and inside.sum() > 100  # a full square away from the edges
    assert (heights < 5).any()  # and clipped at the border
    assert torch.equal(out[~zero], x[~zero])


def trainer(image_cache: Path, augment: dict, seed: int = 0, **overrides) -> Trainer:  # noqa: ANN003
    spec = job({"name": "cifar10", "augment": augment}, seed=seed, **overrides)
    t = Trainer(spec, RecordingReporter(), datasets_dir=image_cache)
    t.setup()
    return t


def test_augmented_batches_follow_the_seed_and_leave_the_data_order_alone(image_cache: Path) -> None:
    batch = torch.arange(64)

    def two_batches(t: Trainer) -> torch.Tensor:
        return torch.stack([t.data.training_inputs(t.data.x_train[batch], t.augmentation) for _ in range(2)])

    first, same, other = (two_batches(trainer(image_cache, ALL_AUGMENTATIONS, seed)) for seed in (5, 5, 6))
    assert torch.equal(first, same)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # the same samples, augmented anew each time
    plain = trainer(image_cache, {}, seed=5)
    assert plain.augmentation is None
    assert not torch.equal(first[0], plain.data.training_inputs(plain.data.x_train[batch], None))

    # The data order: the same draws with augmentation on or off.
    augmented, plain = trainer(image_cache, ALL_AUGMENTATIONS, 5, epochs=2), trainer(image_cache, {}, 5, epochs=2)
    augmented.train()
    plain.train()
    assert torch.equal(augmented.order_generator.get_state(), plain.order_generator.get_state())


def test_cutout_in_the_step_zeroes_a_square_of_the_normalised_batch(image_cache: Path) -> None:
    t = trainer(image_cache, {"cutout": {"size": 6}})
    x = t.data.x_train[:50]
    augmented, plain = t.data.training_inputs(x, t.augmentation), t.data.inputs(x)  # the mlp's flat view
    augmented, plain = augmented.reshape(x.shape), plain.reshape(x.shape)
    changed = augmented != plain
    assert bool((augmented[changed] == 0).all())
    per_sample = changed.any(dim=1).flatten(1).sum(dim=1)  # pixels zeroed, channels together
    assert per_sample.max() <= 36 and (per_sample == 36).any()


def test_evaluation_is_never_augmented(image_cache: Path) -> None:
    t = trainer(image_cache, ALL_AUGMENTATIONS)
    before = t.augmentation.generator.get_state()
    loss, _, predicted = t.evaluate(t.data.x_val, t.data.y_val)
    assert torch.equal(t.augmentation.generator.get_state(), before)  # nothing drawn
    t.model.eval()
    with torch.no_grad():
        logits = t.model(t.data.images(t.data.x_val))  # the plain standardised view
    assert torch.equal(predicted, logits.argmax(dim=1))
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, t.data.y_val).item(), rel=1e-5)
    assert t.evaluate(t.data.x_val, t.data.y_val)[0] == loss


# --------------------------------------------------------------------------- exact resume


def resume_spec() -> JobSpec:
    return job(
        {"name": "cifar10", "validation": 0.2, "augment": ALL_AUGMENTATIONS},
        model={"arch": "cnn", "channels": [4, 8], "hidden": [16], "dropout": 0.2},  # dropout: the torch RNG too
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        schedule={"name": "warmup_cosine", "warmup_steps": 3},
        batch_size=64,  # 240 training samples: 4 steps an epoch
        epochs=2,
        seed=11,
    )


def run(spec: JobSpec, image_cache: Path, resume: bytes | None = None) -> tuple[Trainer, CheckpointingReporter]:
    reporter = CheckpointingReporter()
    t = Trainer(spec, reporter, checkpoint_every_steps=3, datasets_dir=image_cache)
    t.setup()
    if resume is not None:
        t.load_state_dict(checkpoint_from_bytes(resume, CPU))
    t.result = t.train()
    return t, reporter


@pytest.mark.usefixtures("image_sizes")  # the schedule's length and the last step are the test files'
def test_resume_mid_epoch_with_augmentation_equals_never_stopping(image_cache: Path) -> None:
    spec = resume_spec()
    straight, straight_reporter = run(spec, image_cache)
    assert {3, 4, 6} <= set(straight_reporter.checkpoints)  # mid-epoch (3, 6) and an epoch end (4)
    for at, blob in straight_reporter.checkpoints.items():
        if at >= spec.total_steps:
            continue
        resumed, resumed_reporter = run(spec, image_cache, resume=blob)
        for name, tensor in straight.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[name], tensor), f"resumed at step {at}: {name} differs"
        after = [(s, v) for s, v in straight_reporter.history["train_loss"] if s >= at]
        assert resumed_reporter.history["train_loss"] == after, at
        assert resumed.result.final_metrics == straight.result.final_metrics
        assert torch.equal(resumed.augmentation.generator.get_state(), straight.augmentation.generator.get_state())


def test_a_checkpoint_from_before_augmentation_still_loads(image_cache: Path) -> None:
    spec = resume_spec()
    t = Trainer(spec, datasets_dir=image_cache)
    t.setup()
    state = t.state_dict()
    del state["rng"]["augment"]  # as checkpoints written before the key existed
    fresh = t.augmentation.generator.get_state()
    t.load_state_dict(checkpoint_from_bytes(checkpoint_to_bytes(state), CPU))
    assert torch.equal(t.augmentation.generator.get_state(), fresh)


# --------------------------------------------------------------------------- learning


def test_an_mlp_learns_mnist_and_a_cnn_learns_cifar10_with_augmentation(image_cache: Path) -> None:
    mlp = run_training(
        job({"name": "mnist"}, model={"arch": "mlp", "hidden": [64]}, epochs=3), datasets_dir=image_cache
    )
    assert mlp.final_metrics["val_accuracy"] > 0.6  # chance: 0.1
    # No flip here: the test images tell classes by where a block lies, and a mirror moves it.
    cnn = run_training(
        job(
            {"name": "cifar10", "augment": {"random_crop": {"padding": 2}, "cutout": {"size": 4}}},
            model={"arch": "cnn", "channels": [8, 16], "hidden": [32]},
            optimizer={"name": "adam", "lr": 0.01},
            epochs=5,
        ),
        datasets_dir=image_cache,
    )
    assert cnn.final_metrics["val_accuracy"] > 0.6


def test_diagnostics_read_the_stored_images_through_the_same_view(image_cache: Path) -> None:
    spec = job(
        {"name": "mnist", "augment": {"random_crop": {"padding": 2}}},
        model={"arch": "mlp", "hidden": [8]},
        diagnostics={"hessian": {"top_k": 2, "max_samples": 64}, "landscape": {"kind": "1d", "resolution": 5}},
    )
    t = Trainer(spec, datasets_dir=image_cache)
    t.setup()
    result = t.train()
    assert result.diagnostics["hessian"]["samples"] == 64
    # alpha 1 of the line is the trained weights: its validation loss (every sample, chunked) is
    # the one evaluate reports, from the same standardised view, not augmented.
    line = result.landscape["line"]
    assert line["alpha"][3] == pytest.approx(1.0)
    assert line["val_loss"][3] == pytest.approx(result.final_metrics["val_loss"], rel=1e-5)
