"""Packed trials vs the same trials one after another: what packing alone buys.

For K = 1, 4, 16 trials (an lr x seed sweep of one optimizer family), in one process:
  sequential  the solo trainer (trainer/recipe.py) runs the K trials one after another
  packed      the packed trainer (trainer/packed.py) runs them as one pack
Both sides run setup() and train() of the same specs with nobody listening (NullReporter):
no process start, no MLflow run, no database (the per-job costs a worker adds on top), so
the ratio is the packing alone. Rounds alternate the two sides and the median of each
round's ratio is the figure (this shared VM's speed drifts; paired rounds cancel most of it).
The machine's load average is printed with each model, since other processes share it.

Columns: trials/hour (K / wall time of the side), steps/s (trial-steps per second: K x
steps / wall time; per trial, divide by K), ratio (the median of the rounds' sequential /
packed wall times). Setup (data, models) is counted on both sides: a pack sets up each trial
as its solo run would. Recurrent models are measured here although `packable` leaves them
alone on a CPU, where this bench measured them slower packed.

--optimizer-variants also times one optimizer step of a K=16 digits-MLP Adam pack three
ways: torch.optim (one Adam per trial over views of the stacked rows), the broadcast rule
(trainer/packed_optim.py, hyperparameters as [K, 1] columns; the default, since it is the
solo step bit for bit), torch's fused kernel called per group of trials.

  PYTHONPATH=. .venv/bin/python bench/packing.py [--rounds 3] [--epochs N] [--threads N] [--ks 1,4,16]
      [--models "digits MLP,digits CNN,sequence_memory LSTM"] [--optimizer-variants]

The last line reads `speedup at K=16, digits MLP: <ratio>x`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.spec import JobSpec  # noqa: E402
from trainer.packed import PackedTrainer, packable  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402

# name -> (spec fields, epochs): the MLP as in examples/studies/five-optimizers-digits.yaml; the
# slower models train fewer epochs so that a round stays under a minute.
MODELS = {
    "digits MLP": ({"dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]}}, 15),
    "digits CNN": ({"dataset": {"name": "digits"}, "model": {"arch": "cnn", "channels": [16, 32], "hidden": [64]}}, 3),
    "sequence_memory LSTM": ({"dataset": {"name": "sequence_memory"}, "model": {"arch": "lstm", "hidden_size": 64}}, 2),
}


def sweep(base: dict, k: int, epochs: int, device: str) -> list[JobSpec]:
    """K trials: four learning rates x seeds, Adam, batch 64 (the five-optimizers study's settings)."""
    return [
        JobSpec.model_validate(
            base | {"optimizer": {"name": "adam", "lr": 0.001 * (1 + i % 4)}, "seed": i, "epochs": epochs,
                    "batch_size": 64, "device": device}
        )
        for i in range(k)
    ]


def sequential(specs: list[JobSpec]) -> float:
    start = time.perf_counter()
    for spec in specs:
        trainer = Trainer(spec)
        trainer.setup()
        trainer.train()
    return time.perf_counter() - start


def packed(specs: list[JobSpec]) -> float:
    start = time.perf_counter()
    trainer = PackedTrainer(specs)
    trainer.setup()
    trainer.train()
    return time.perf_counter() - start


def optimizer_variants(k: int = 16, repeats: int = 200) -> dict[str, float]:
    """Microseconds per optimizer step, K trials of the digits MLP (17,226 weights each)."""
    from trainer.packed_optim import StackedAdam

    n = 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    flat, grad = torch.randn(k, n), torch.randn(k, n) * 1e-2
    views = [row.view(n) for row in flat]
    for view, g in zip(views, grad):
        view.grad = g
    per_trial = [torch.optim.Adam([view], lr=0.001 * (1 + i % 4)) for i, view in enumerate(views)]
    groups = [{k_: v for k_, v in opt.param_groups[0].items() if k_ != "params"} for opt in per_trial]
    stacked = StackedAdam(groups, n, torch.device("cpu"))
    lrs = torch.tensor([[g["lr"] for g in groups]] * 32, dtype=torch.float64).numpy()

    def torch_optim() -> None:
        for opt in per_trial:
            opt.step()

    def rule(fused: bool):  # noqa: ANN202
        stacked.use_fused = fused
        plan = stacked.window(lrs)
        return lambda: stacked.update(flat, grad, plan, 0)

    timings = {}
    for name, step in [("torch.optim per trial", torch_optim), ("broadcast rule", rule(False)), ("fused per group", rule(True))]:
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        timings[name] = (time.perf_counter() - start) / repeats * 1e6
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every model (default: each its own)")
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizer-variants", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, device {args.device}")
    if args.optimizer_variants:
        print("one Adam step over K=16 digits-MLP trials (us):")
        for name, us in optimizer_variants().items():
            print(f"  {name:24s} {us:8.0f}")
    header = f"{'model':22s} {'K':>3s} {'packed trials/h':>16s} {'seq trials/h':>13s} {'packed steps/s':>15s} {'seq steps/s':>12s} {'ratio':>6s}"
    headline = None
    for model in args.models.split(","):
        base, epochs = MODELS[model]
        epochs = args.epochs or epochs
        probe = sweep(base, 1, epochs, args.device)
        _, reasons = packable(probe, worthwhile=False)  # measured here even where the worker would not pack
        if reasons:
            print(f"{model}: runs solo, not packed: {reasons[0]}")
            continue
        warm = sweep(base, 2, 1, args.device)  # data read and kernels primed before either side is timed
        packed(warm), sequential(warm)
        print(f"\n{model}, {epochs} epochs, load average {os.getloadavg()[0]:.1f}")
        print(header)
        for k in ks:
            specs = sweep(base, k, epochs, args.device)
            steps = specs[0].total_steps
            packed_times, sequential_times, ratios = [], [], []
            for _ in range(args.rounds):
                p = packed(specs)
                s = sequential(specs)
                packed_times.append(p)
                sequential_times.append(s)
                ratios.append(s / p)
            p, s, ratio = statistics.median(packed_times), statistics.median(sequential_times), statistics.median(ratios)
            print(
                f"{model:22s} {k:3d} {k / p * 3600:16.0f} {k / s * 3600:13.0f} "
                f"{k * steps / p:15.0f} {k * steps / s:12.0f} {ratio:5.2f}x"
            )
            if model == "digits MLP" and k == 16:
                headline = ratio
        print(f"(load average after: {os.getloadavg()[0]:.1f})")
    if headline is not None:
        print(f"speedup at K=16, digits MLP: {headline:.2f}x")


if __name__ == "__main__":
    main()
