"""Samples/s of Descent's trainer against the best bare loop, per workload, in one table.

For each workload -- MLP on digits, MLP on MNIST, CNN on CIFAR-10, ResNet-18 on CIFAR-10,
LSTM and Transformer on sequence_memory -- it measures

  (a) the best bare loop a skilled person would write for it: the same model (built by
      the same builder, so the same layers and initial weights), the same optimizer, the
      data on the device (images as uint8, standardised per batch), batches gathered by
      index on the device, the same precision (autocast, a GradScaler for fp16) and
      compile setting (compiled ahead of the timed loop), channels_last and cuDNN
      autotuning on CUDA, and the validation loss and accuracy each epoch that every job
      reports; it logs nothing. Two of them: the *minimal* loop, which computes nothing
      more, and the *same-metrics* loop, which also computes what a job reports (each
      step's loss, lr and global gradient norm, each epoch's running train accuracy) on
      the device and reads it back once an epoch, as bench/trainer_overhead.py's does;
  (b) Descent's trainer with the worker's reporter and MLflow sink logging train_loss, lr
      and grad_norm every step to a real MLflow server (bench/trainer_overhead.py's);

and the ratios b/a: the medians of rounds made back to back (each side goes first in
turn). `ratio` is over the same-metrics loop (issue 12's goal, >= 0.97, as in
trainer_overhead.py); `vs min` over the minimal loop, where small models also pay for
the per-step metrics themselves (the gradient norm reads every gradient each step).
Setup (reading the set, building the model, compiling) is outside both timings.

MNIST and CIFAR-10 come from the dataset cache when it holds them verified; otherwise
(or with --synthetic) full-size random sets in the real formats are written to a
temporary folder (tests/dataset_files.py): the throughput is real, accuracy meaningless.

On a CPU the runs are kept short (subsets, one or two epochs; ResNet-18 runs ~60
samples/s here). On CUDA the image sets run in full, and rows are added for ResNet-18
at fp32, bf16 and bf16+compile; --time-to-94 trains ResNet-18 on the real CIFAR-10 until
94% validation accuracy and prints the time (next to airbench's 3.29 s on an A100,
with its own, smaller network).

  PYTHONPATH=$PWD .venv/bin/python bench/throughput.py [--rounds 3] [--device auto]
      [--synthetic] [--only mlp-digits,resnet18-cifar10] [--time-to-94] [--no-isolate]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from jobs.spec import JobSpec  # noqa: E402
from trainer.data import load_split  # noqa: E402
from trainer.models import MODEL_BUILDERS  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.recipe import Trainer, resolve_device  # noqa: E402
from trainer_overhead import mlflow_server  # noqa: E402
from worker.metrics_sink import MlflowMetricSink  # noqa: E402
from worker.monitor import JobReporter, StopReason  # noqa: E402

IMAGE_SETS = {"mnist": (60_000, 10_000), "cifar10": (50_000, 10_000)}
AIRBENCH_94_SECONDS = 3.29  # KellerJordan/cifar10-airbench, airbench94 on an A100 (its README)


def workloads(gpu: bool) -> dict[str, dict]:
    """name -> spec payload (device, seed and per-step logging are added by the caller).
    CPU: bounded, a few seconds a run; CUDA: the real sizes."""

    def image(name: str, cpu_subset: int, cpu_validation: float) -> dict:
        return {"name": name} if gpu else {"name": name, "subset": cpu_subset, "validation": cpu_validation}

    adam = {"name": "adam", "lr": 0.001}
    sgd = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005}
    memory = {"name": "sequence_memory", "n_samples": 4000 if gpu else 1500, "length": 20}
    return {
        "mlp-digits": {"dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
                       "optimizer": adam, "batch_size": 64, "epochs": 40},
        "mlp-mnist": {"dataset": image("mnist", 4096, 0.02), "model": {"arch": "mlp", "hidden": [512, 256]},
                      "optimizer": adam, "batch_size": 512 if gpu else 128, "epochs": 2},
        "cnn-cifar10": {"dataset": image("cifar10", 1024, 0.004), "model": {"arch": "cnn", "channels": [32, 64],
                        "hidden": [128]}, "optimizer": sgd, "batch_size": 512 if gpu else 128, "epochs": 2 if gpu else 1},
        "resnet18-cifar10": {"dataset": image("cifar10", 192, 0.002), "model": {"arch": "resnet", "depth": 18},
                             "optimizer": sgd, "batch_size": 512 if gpu else 64, "epochs": 1},
        "lstm-memory": {"dataset": memory, "model": {"arch": "lstm", "hidden_size": 64}, "optimizer": adam,
                        "batch_size": 64, "epochs": 10},
        "transformer-memory": {"dataset": memory, "model": {"arch": "transformer"}, "optimizer": adam,
                               "batch_size": 64, "epochs": 5 if gpu else 3},
    }  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(
    spec: JobSpec, device: torch.device, datasets_dir: Path | None, same_metrics: bool = False
) -> tuple[int, float, float]:
    """(training samples, seconds, CPU seconds): the loop a skilled person writes for this spec.

    same_metrics: it also computes what a Descent job reports -- each step's loss, lr and
    global gradient norm, each epoch's running train accuracy -- the cheapest way, on the
    device, read back once an epoch (bench/trainer_overhead.py's same-metrics loop); else
    the minimal loop, which computes nothing a job does not need to train."""
    data = load_split(spec, device, datasets_dir=datasets_dir)
    torch.manual_seed(spec.seed)
    model = MODEL_BUILDERS[spec.model.arch](spec.model, data.shape, data.n_classes).to(device)
    cuda = device.type == "cuda"
    if cuda:
        tf32 = spec.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        if spec.model.arch in ("cnn", "resnet"):
            model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(list(model.parameters()), spec.optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if spec.precision == "fp16" else None
    n, batch_size = len(data.x_train), spec.batch_size
    step_model = model
    if spec.compile:  # compiled for both batch shapes before the clock starts
        step_model = torch.compile(model, dynamic=False)
        for size in {batch_size, n % batch_size or batch_size}:
            with autocast():
                nn.functional.cross_entropy(step_model(data.inputs(data.x_train[:size])), data.y_train[:size]).backward()
        optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(spec.seed)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    params = list(model.parameters())
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        losses_seen, norm_parts, lrs, logits_seen = [], [], [], []
        for i in range(0, n, batch_size):
            batch = order[i : i + batch_size]
            with autocast():
                logits = step_model(data.inputs(data.x_train[batch]))
                loss = nn.functional.cross_entropy(logits, data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                if same_metrics:
                    scaler.unscale_(optimizer)  # the norm of the true gradients, as the trainer logs it
            if same_metrics:
                norm_parts.extend(torch._foreach_norm([g for p in params if (g := p.grad) is not None]))
                lrs.append(optimizer.param_groups[0]["lr"])
                losses_seen.append(loss.detach())
                logits_seen.append(logits.detach())
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
        if same_metrics:  # reduced on the device, read back once an epoch
            accuracy = (torch.cat(logits_seen).argmax(dim=1) == data.y_train[order]).float().mean()
            norms = torch.linalg.vector_norm(torch.stack(norm_parts).reshape(len(lrs), -1), dim=1)
            torch.cat([torch.stack(losses_seen).float(), norms.float(), accuracy.reshape(1)]).tolist()
        with torch.no_grad(), autocast():  # the per-epoch validation loss and accuracy every job reports
            model.eval()
            losses, correct = [], []
            for j in range(0, len(data.x_val), 8192):
                logits = model(data.inputs(data.x_val[j : j + 8192]))
                y = data.y_val[j : j + 8192]
                losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").float())
                correct.append((logits.argmax(dim=1) == y).sum())
            torch.stack([torch.stack(losses).sum(), torch.stack(correct).sum()]).tolist()
            model.train()
    sync(device)
    return n * spec.epochs, time.perf_counter() - start, time.process_time() - cpu_start


class EpochClock(JobReporter):
    """The worker's reporter, noting when the last epoch's metrics (validation included) are in:
    the end-of-run evaluation over both whole splits, which the bare loop does not do, is
    left out of the rate (it is paid once a job, not per step)."""

    def __init__(self, sink: MlflowMetricSink, epochs: int) -> None:
        super().__init__(sink)
        self.epochs, self.last_epoch_done, self.last_epoch_cpu = epochs, 0.0, 0.0

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        super().log_metrics(step, metrics)
        if metrics.get("epoch") == self.epochs:  # (read back already: the device has finished it)
            self.last_epoch_done, self.last_epoch_cpu = time.perf_counter(), time.process_time()


def descent_trainer(spec: JobSpec, client, experiment_id: str, datasets_dir: Path | None) -> tuple[int, float, float]:  # noqa: ANN001
    run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=1.0, buffer_limit=10_000_000)
    reporter = EpochClock(sink, spec.epochs)
    trainer = Trainer(spec, reporter, datasets_dir=datasets_dir)
    trainer.setup()
    sync(trainer.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = trainer.train()
    sink.close()
    client.set_terminated(run_id)
    samples = len(trainer.data.x_train) * result.epochs
    return samples, reporter.last_epoch_done - start, reporter.last_epoch_cpu - cpu_start


class Until94(JobReporter):
    """Notes when val_accuracy first reaches 94%, and stops the run there."""

    def __init__(self, sink: MlflowMetricSink) -> None:
        super().__init__(sink)
        self.started = time.perf_counter()
        self.reached: tuple[int, float] | None = None

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        super().log_metrics(step, metrics)
        if self.reached is None and metrics.get("val_accuracy", 0.0) >= 0.94:
            self.reached = (int(metrics["epoch"]), time.perf_counter() - self.started)
            self.request_stop(StopReason.cancel)


def time_to_94(device: str, datasets_dir: Path, client, experiment_id: str) -> str:  # noqa: ANN001
    spec = JobSpec.model_validate({
        "name": "resnet18-94", "device": device, "precision": "bf16", "compile": True, "epochs": 30,
        "batch_size": 512, "log_every_steps": 1, "seed": 0,
        "dataset": {"name": "cifar10", "augment": {"random_crop": {"padding": 4}, "horizontal_flip": True}},
        "model": {"arch": "resnet", "depth": 18},
        "optimizer": {"name": "sgd", "lr": 0.4, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 200, "min_lr": 0.0},
    })  # fmt: skip
    run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=1.0, buffer_limit=10_000_000)
    reporter = Until94(sink)
    trainer = Trainer(spec, reporter, datasets_dir=datasets_dir)
    trainer.setup()
    reporter.started = time.perf_counter()
    result = trainer.train()
    sink.close()
    compile_s = trainer.speed.compile_seconds or 0.0
    gpu = torch.cuda.get_device_name(trainer.device)
    if reporter.reached is None:
        return (f"ResNet-18/CIFAR-10 (bf16+compile, batch 512): 94% not reached in {spec.epochs} epochs "
                f"(best final val_accuracy {result.final_metrics['val_accuracy']:.4f}) on {gpu}")  # fmt: skip
    epoch, seconds = reporter.reached
    return (f"ResNet-18/CIFAR-10 (bf16+compile, batch 512, crop+flip): 94% validation accuracy after epoch {epoch}, "
            f"{seconds:.1f} s of training (+{compile_s:.0f} s compiling) on {gpu}; airbench94: "
            f"{AIRBENCH_94_SECONDS} s on an A100 with its own network")  # fmt: skip


def image_sets(synthetic: bool, workdir: Path) -> tuple[Path, str]:
    """(datasets_dir, how the sets were got)."""
    if not synthetic:
        from worker.dataset_cache import DatasetCache

        cache = DatasetCache.from_settings()
        if all(cache.is_ready(name) for name in IMAGE_SETS):
            return cache.root, f"the dataset cache ({cache.root})"
    from tests.dataset_files import write_image_set

    for name, (n_train, n_test) in IMAGE_SETS.items():
        write_image_set(workdir, name, n_train, n_test)
    return workdir, "synthetic full-size sets in the real formats (accuracy meaningless)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="written sets even when the cache holds the real ones")
    parser.add_argument("--only", default="", help="comma-separated workload names")
    parser.add_argument("--time-to-94", action="store_true", help="CUDA, real CIFAR-10: ResNet-18's time to 94%%")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=os.cpu_count() >= 2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    chosen = workloads(gpu)
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(",")}
    runs: list[tuple[str, dict]] = [(name, payload) for name, payload in chosen.items()]
    if gpu and "resnet18-cifar10" in chosen:  # what each speed setting buys, on the model where it shows
        resnet = chosen["resnet18-cifar10"]
        runs += [("resnet18-cifar10 bf16", resnet | {"precision": "bf16"}),
                 ("resnet18-cifar10 bf16+compile", resnet | {"precision": "bf16", "compile": True})]  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="descent-throughput-") as workdir, mlflow_server(args.isolate) as (
        client,
        experiment_id,
    ):
        needs_images = any(p["dataset"]["name"] in IMAGE_SETS for _, p in runs) or args.time_to_94
        datasets_dir, source = image_sets(args.synthetic, Path(workdir)) if needs_images else (None, "-")
        where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} torch thread(s)"
        print(f"device: {where}; torch {torch.__version__}; image sets: {source}", flush=True)
        # cpu ratio: samples per CPU-second of this process (the sink's thread included), Descent over the
        # same-metrics loop: what the trainer costs, which other processes' load disturbs far less.
        # ratio: Descent over the same-metrics loop (the goal); vs minimal: over the minimal loop.
        print(f"{'workload':<24}{'precision':>14}{'samples':>9}{'minimal/s':>11}{'same/s':>10}{'Descent/s':>11}"
              f"{'ratio':>7}{'vs min':>9}{'cpu ratio':>10}   rounds (ratio)", flush=True)  # fmt: skip
        ratios_all = []
        for name, payload in runs:
            spec = JobSpec.model_validate({"name": name.replace(" ", "-").replace("+", "-")} | payload
                                          | {"device": args.device, "log_every_steps": 1, "seed": 0})  # fmt: skip
            bare_loop(spec, device, datasets_dir)  # warm-up: first-call costs (and cuDNN autotuning) in none
            sides = {
                "minimal": lambda: bare_loop(spec, device, datasets_dir),
                "same": lambda: bare_loop(spec, device, datasets_dir, same_metrics=True),
                "descent": lambda: descent_trainer(spec, client, experiment_id, datasets_dir),
            }
            rate: dict[str, list[float]] = {side: [] for side in sides}
            cpu_rate: dict[str, list[float]] = {side: [] for side in sides}
            for round_ in range(args.rounds):
                order = list(sides)[round_ % 3 :] + list(sides)[: round_ % 3]  # each side goes first in turn
                for side in order:
                    samples, seconds, cpu = sides[side]()
                    rate[side].append(samples / seconds)
                    cpu_rate[side].append(samples / cpu)

            def paired(over: str, rates: dict[str, list[float]] = rate) -> list[float]:
                return [d / b for d, b in zip(rates["descent"], rates[over])]

            ratios = paired("same")
            ratios_all.append(statistics.median(ratios))
            setting = spec.precision + ("+compile" if spec.compile else "")
            print(f"{name:<24}{setting:>14}{samples:>9,}{statistics.median(rate['minimal']):>11,.0f}"
                  f"{statistics.median(rate['same']):>10,.0f}{statistics.median(rate['descent']):>11,.0f}"
                  f"{statistics.median(ratios):>7.3f}{statistics.median(paired('minimal')):>9.3f}"
                  f"{statistics.median(paired('same', cpu_rate)):>10.3f}   "
                  f"{', '.join(f'{r:.3f}' for r in ratios)}", flush=True)  # fmt: skip
        print(f"summary: {len(ratios_all)} rows, ratio min {min(ratios_all):.3f}, median "
              f"{statistics.median(ratios_all):.3f} (goal >= 0.97)", flush=True)  # fmt: skip
        if args.time_to_94:
            if not gpu or "synthetic" in source:
                print("time to 94%: skipped (needs CUDA and the real CIFAR-10 files in the dataset cache)")
            else:
                print(time_to_94(args.device, datasets_dir, client, experiment_id), flush=True)


if __name__ == "__main__":
    main()
