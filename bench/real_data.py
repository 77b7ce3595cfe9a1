"""Real data at real size: an MLP on MNIST and ResNet-18 on CIFAR-10 with crop and flip.

Trains both through Descent's trainer (the same code a job runs) on whatever device it
finds and prints, per epoch, the training samples/s, the epoch's time (training, then the
full validation pass over the 10,000 test images) and the validation accuracy.

The sets come from the dataset cache (DATASETS_DIR; fetched there when missing and
downloads are allowed). `--synthetic` writes full-size random sets in the real file
formats into a temporary cache instead: the throughput is real, the accuracy meaningless.

On a GPU the defaults are 10 epochs of the MLP and 30 of ResNet-18 (the README's reference
accuracies). On a CPU, one epoch each, ResNet-18 on a stratified subset of 512 training
images validated on 1,000 held out (the full epoch's time is then estimated from the
measured training and validation samples/s).

  PYTHONPATH=$PWD .venv/bin/python bench/real_data.py [--synthetic] [--device auto]
      [--mnist-epochs N] [--cifar-epochs N] [--cifar-subset N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec  # noqa: E402
from trainer.recipe import Trainer, resolve_device  # noqa: E402
from trainer.reporting import NullReporter  # noqa: E402


class EpochClock(NullReporter):
    """Times each epoch's training steps and its validation pass; keeps val_accuracy."""

    def __init__(self, n_train: int, n_val: int, label: str) -> None:
        self.n_train, self.n_val, self.label = n_train, n_val, label
        self.epoch_started = self.last_step = time.perf_counter()
        self.rows: list[dict[str, float]] = []

    def progress(self, epoch: int, step: int) -> None:
        self.last_step = time.perf_counter()

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if "val_accuracy" not in metrics:
            return
        now = time.perf_counter()
        train_s, val_s = self.last_step - self.epoch_started, now - self.last_step
        row = {"epoch": metrics["epoch"], "train_s": train_s, "val_s": val_s, "samples_per_s": self.n_train / train_s,
               "val_samples_per_s": self.n_val / val_s, "val_accuracy": metrics["val_accuracy"]}  # fmt: skip
        self.rows.append(row)
        print(f"  {self.label} epoch {row['epoch']:>3.0f}: {row['samples_per_s']:>9,.0f} samples/s, "
              f"train {train_s:7.1f} s + validation {val_s:6.1f} s, val_accuracy {row['val_accuracy']:.4f}",
              flush=True)  # fmt: skip
        self.epoch_started = self.last_step = time.perf_counter()


def run(label: str, spec: JobSpec, datasets_dir: Path) -> EpochClock:
    clock = EpochClock(*spec.split_sizes, label)
    started = time.perf_counter()
    trainer = Trainer(spec, clock, datasets_dir=datasets_dir)
    trainer.setup()
    setup_s = time.perf_counter() - started
    print(f"  {label}: setup (read the set, to the device, build the model) {setup_s:.1f} s", flush=True)
    clock.epoch_started = clock.last_step = time.perf_counter()
    trainer.train()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic", action="store_true", help="full-size random sets in the real formats")
    parser.add_argument("--datasets-dir", type=Path, default=None, help="default: DATASETS_DIR")
    parser.add_argument("--mnist-epochs", type=int, default=None)
    parser.add_argument("--cifar-epochs", type=int, default=None)
    parser.add_argument("--cifar-subset", type=int, default=None, help="training samples (CPU default 1024)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)

    workdir = tempfile.TemporaryDirectory(prefix="descent-real-data-")
    if args.synthetic:
        from tests.dataset_files import write_image_set

        datasets_dir = Path(workdir.name)
        for set_name, (n_train, n_test) in {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}.items():
            write_image_set(datasets_dir, set_name, n_train, n_test)
        print("data: synthetic full-size sets in the real formats (accuracy is meaningless)", flush=True)
    else:
        from worker.dataset_cache import DatasetCache, ensure_image_set

        cache = DatasetCache.from_settings()
        if args.datasets_dir is not None:
            cache = dataclasses.replace(cache, root=args.datasets_dir.resolve())
        for set_name in ("mnist", "cifar10"):
            datasets_dir = ensure_image_set(set_name, cache)  # fetched when missing (DATASETS_DOWNLOAD)
        print(f"data: {datasets_dir}", flush=True)

    mnist_epochs = args.mnist_epochs or (10 if gpu else 1)
    cifar_epochs = args.cifar_epochs or (30 if gpu else 1)
    cifar_subset = args.cifar_subset or (None if gpu else 512)
    # On a CPU the 10,000 test images alone take minutes through ResNet-18: hold out 1,000
    # training images instead and scale the validation time to 10,000 in the summary.
    cifar_validation = "test" if gpu else 0.02
    mlp = JobSpec.model_validate({
        "name": "mlp-mnist", "device": args.device, "epochs": mnist_epochs, "batch_size": 128, "log_every_steps": 10,
        "dataset": {"name": "mnist"}, "model": {"arch": "mlp", "hidden": [512, 256], "dropout": 0.2},
        "optimizer": {"name": "adam", "lr": 0.001}, "schedule": {"name": "cosine"},
    })  # fmt: skip
    resnet = JobSpec.model_validate({
        "name": "resnet18-cifar10", "device": args.device, "epochs": cifar_epochs, "batch_size": 128,
        "log_every_steps": 10,
        "dataset": {"name": "cifar10", "subset": cifar_subset, "validation": cifar_validation,
                    "augment": {"random_crop": {"padding": 4}, "horizontal_flip": True}},
        "model": {"arch": "resnet", "depth": 18},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005},
        "schedule": {"name": "cosine"},
    })  # fmt: skip

    print(f"MLP [512, 256] on mnist, adam, {mnist_epochs} epochs, batch 128:", flush=True)
    mlp_clock = run("mlp/mnist", mlp, datasets_dir)
    subset_note = "" if gpu else f", {cifar_subset} training samples, 1,000 held out to validate"
    print(f"ResNet-18 on cifar10 with crop+flip, sgd+nesterov, {cifar_epochs} epochs, batch 128{subset_note}:",
          flush=True)  # fmt: skip
    resnet_clock = run("resnet18/cifar10", resnet, datasets_dir)

    print("summary:")
    for label, clock, (full_train, full_val) in (
        ("mlp/mnist", mlp_clock, (60_000, 10_000)),
        ("resnet18/cifar10", resnet_clock, (50_000, 10_000)),
    ):
        rate = max(row["samples_per_s"] for row in clock.rows)
        val_rate = max(row["val_samples_per_s"] for row in clock.rows)
        epoch_s = full_train / rate + full_val / val_rate
        estimated = " (estimated from the measured rates)" if clock.n_train < full_train else ""
        print(f"{label}: {rate:,.0f} samples/s training, {val_rate:,.0f} samples/s validation, "
              f"{epoch_s:.1f} s per full epoch{estimated}, "
              f"val_accuracy {clock.rows[-1]['val_accuracy']:.4f} after {len(clock.rows)} epochs")  # fmt: skip
    workdir.cleanup()


if __name__ == "__main__":
    main()
