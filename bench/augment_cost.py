"""What on-device augmentation costs per training batch.

Writes an MNIST-shaped set (60,000 training and 10,000 test images, tests/dataset_files.py)
into a temporary dataset cache, sets up Descent's trainer on it twice -- without
augmentation and with random_crop (padding 4) + horizontal_flip -- and times the training
step as the recipe runs it (the batch's stored uint8 images -> augmented, standardised
inputs -> forward, loss, backward, optimizer step) over the same batches in the same
order. Rounds alternate the two; each figure is the median over rounds. Also times the
input preparation alone (gather + augmentation + standardisation), per batch.

  .venv/bin/python bench/augment_cost.py [--batch-size 128] [--steps 200] [--rounds 5] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec  # noqa: E402
from tests.dataset_files import write_image_set  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402

AUGMENTATIONS = {"none": {}, "crop+flip": {"random_crop": {"padding": 4}, "horizontal_flip": True}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer: Trainer, batches: list[torch.Tensor]) -> float:
    """Seconds for the recipe's step on each batch."""
    data, model, optimizer = trainer.data, trainer.model, trainer.optimizer
    sync(trainer.device)
    start = time.perf_counter()
    for batch in batches:
        loss = trainer.loss_fn(model(data.training_inputs(data.x_train[batch], trainer.augmentation)), data.y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(trainer.device)
    return time.perf_counter() - start


def timed_inputs(trainer: Trainer, batches: list[torch.Tensor]) -> float:
    """Seconds to prepare each batch's inputs alone."""
    data = trainer.data
    sync(trainer.device)
    start = time.perf_counter()
    for batch in batches:
        data.training_inputs(data.x_train[batch], trainer.augmentation)
    sync(trainer.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", default="256,128", help="the MLP's hidden widths")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = [int(w) for w in args.hidden.split(",")]

    with tempfile.TemporaryDirectory() as cache:
        write_image_set(Path(cache), "mnist", n_train=60_000, n_test=10_000)
        trainers = {}
        for name, augment in AUGMENTATIONS.items():
            spec = JobSpec.model_validate(
                {"dataset": {"name": "mnist", "augment": augment}, "model": {"arch": "mlp", "hidden": hidden},
                 "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": args.batch_size, "device": args.device}
            )  # fmt: skip
            trainers[name] = Trainer(spec, datasets_dir=Path(cache))
            trainers[name].setup()
    device = trainers["none"].device
    n = len(trainers["none"].data.x_train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    batches = [order[i : i + args.batch_size] for i in range(0, args.steps * args.batch_size, args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size]

    for trainer in trainers.values():  # warm-up: first-call costs land in no measurement
        timed_steps(trainer, batches[:10])
    step_rates: dict[str, list[float]] = {name: [] for name in trainers}
    input_us: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(args.rounds):
        names = list(trainers) if round_ % 2 == 0 else list(reversed(trainers))
        for name in names:
            step_rates[name].append(len(batches) * args.batch_size / timed_steps(trainers[name], batches))
            input_us[name].append(1e6 * timed_inputs(trainers[name], batches) / len(batches))

    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"MNIST-shaped set: {n} training images stored as uint8 on the device; MLP {hidden}, adam, "
          f"batch {args.batch_size}, {len(batches)} steps a round, {args.rounds} rounds")  # fmt: skip
    for name in trainers:
        rate, prep = statistics.median(step_rates[name]), statistics.median(input_us[name])
        print(f"{name:10s} {rate:10.0f} samples/s (step)   inputs alone {prep:7.0f} us/batch   "
              f"(rounds: {', '.join(f'{r:.0f}' for r in step_rates[name])})")  # fmt: skip
    ratio = statistics.median(a / b for a, b in zip(step_rates["crop+flip"], step_rates["none"]))
    print(f"crop+flip / none: {ratio:.3f} of the throughput (median of paired rounds)")


if __name__ == "__main__":
    main()
