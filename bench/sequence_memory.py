"""Does a plain RNN forget where LSTM and GRU remember? `sequence_memory`, measured.

Trains rnn, lstm and gru (same width, optimizer, budget and seeds) through Descent's
trainer on `sequence_memory` (class = the first token, then length-1 distractors) and
prints, per model, each seed's final validation accuracy and the first epoch at
which validation accuracy reached --solved, then how many seeds solved the task.

Why a bench and not a unit test: which architecture wins is a property of many
seeds, not of one. With Adam a plain RNN often learns T = 30 as well (Adam's
per-parameter scaling makes up for much of the vanishing gradient); the gap grows
with the length. Seeds are not picked: 0..N-1.

  .venv/bin/python bench/sequence_memory.py [--length 30] [--seeds 5] [--epochs 20] [--lr 0.003]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402
from trainer.reporting import RecordingReporter  # noqa: E402

ARCHS = ("rnn", "lstm", "gru")


def run(arch: str, seed: int, args: argparse.Namespace) -> tuple[float, int | None, float]:
    """(final val accuracy, first epoch at or above --solved or None, seconds)."""
    spec = JobSpec.model_validate(
        {"name": f"memory-{arch}", "dataset": {"name": "sequence_memory", "length": args.length, "n_samples": args.samples},
         "model": {"arch": arch, "hidden_size": args.hidden}, "optimizer": {"name": "adam", "lr": args.lr},
         "epochs": args.epochs, "batch_size": args.batch_size, "seed": seed, "device": args.device}
    )  # fmt: skip
    reporter = RecordingReporter()
    started = time.perf_counter()
    trainer = Trainer(spec, reporter)
    trainer.setup()
    result = trainer.train()
    elapsed = time.perf_counter() - started
    curve = [accuracy for _, accuracy in reporter.history["val_accuracy"]]
    solved = next((epoch for epoch, accuracy in enumerate(curve, 1) if accuracy >= args.solved), None)
    return result.final_metrics["val_accuracy"], solved, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--solved", type=float, default=0.95, help="validation accuracy that counts as solved")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"sequence_memory T={args.length}, {args.samples} samples, hidden {args.hidden}, adam lr {args.lr}, "
          f"batch {args.batch_size}, {args.epochs} epochs, seeds 0..{args.seeds - 1}, solved = val acc >= {args.solved}")  # fmt: skip
    for arch in ARCHS:
        runs = [run(arch, seed, args) for seed in range(args.seeds)]
        finals = [final for final, _, _ in runs]
        solved = [epoch for _, epoch, _ in runs if epoch is not None]
        per_seed = "  ".join(f"{final:.2f}@{epoch or '-'}" for final, epoch, _ in runs)
        median_epoch = f"median epoch {statistics.median(solved):.0f}" if solved else "never"
        print(f"{arch:5} solved {len(solved)}/{args.seeds} ({median_epoch})  mean final val acc "
              f"{statistics.mean(finals):.2f}  [final@epoch-solved: {per_seed}]  "
              f"{sum(s for _, _, s in runs):.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
