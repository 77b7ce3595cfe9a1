"""What Descent's trainer costs over a bare PyTorch loop.

Trains the same MLP on the same data with the same optimizer and seed, in one
process, three ways:

- the minimal loop: forward, loss, backward, step, and the validation loss and
  accuracy each epoch that every job reports; it computes nothing else;
- the same-metrics loop: the best loop a skilled person would write to compute what
  a Descent job reports -- each step's loss, lr and global gradient norm, each
  epoch's running train accuracy and validation loss and accuracy -- on the device,
  read back once per epoch, logging nothing;
- Descent's trainer with the worker's reporter and MLflow sink logging train_loss,
  lr and grad_norm every step to a real MLflow server (SQLite store, started here).

Rounds rotate which side goes first; each round's ratios compare runs made back to
back, and the medians of those ratios are the figures (this VM's speed drifts by
+-5% over seconds, which paired rounds cancel).

The MLflow server needs ~0.4 ms of CPU per metric point (measured here, SQLite or
PostgreSQL store): at 3 points a step it would take a whole core. In a deployment
it runs on its own host; here, with --isolate (the default when the machine has
>= 2 cores), it is pinned to the last core and training to the others, with the
same torch thread count for both loops. --no-isolate lets everything share.

  .venv/bin/python bench/trainer_overhead.py [--epochs 100] [--rounds 3] [--device auto] [--log-every 1] [--no-isolate]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.settings import Settings  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from launcher.processes import ProcessGroup, mlflow_command, wait_http  # noqa: E402
from trainer.data import load_split  # noqa: E402
from trainer.recipe import Trainer, resolve_device  # noqa: E402
from worker.metrics_sink import MlflowMetricSink  # noqa: E402
from worker.monitor import JobReporter  # noqa: E402


def bench_mlp(n_features: int, n_classes: int, device: torch.device) -> nn.Module:
    """The job's MLP [128, 64], as a skilled person would write it, for both bare loops."""
    return nn.Sequential(
        nn.Linear(n_features, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, n_classes)
    ).to(device)


def bare_loop(spec: JobSpec, device: torch.device) -> tuple[int, float, float]:
    """The minimal loop."""
    data = load_split(spec, device)
    torch.manual_seed(spec.seed)
    model = bench_mlp(data.n_features, data.n_classes, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.optimizer.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    n = len(data.x_train)
    steps = 0
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, spec.batch_size):
            batch = order[i : i + spec.batch_size]
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        with torch.no_grad():  # the per-epoch validation loss and accuracy every job reports
            model.eval()
            logits = model(data.x_val)
            nn.functional.cross_entropy(logits, data.y_val).item()
            (logits.argmax(dim=1) == data.y_val).float().mean().item()
            model.train()
    sync(device)
    return steps, time.perf_counter() - start, time.process_time() - cpu_start


def same_metrics_loop(spec: JobSpec, device: torch.device) -> tuple[int, float, float]:
    """The minimal loop plus what a Descent job reports, computed the cheapest way: the
    per-step values stay on the device (the loss, the per-parameter gradient norms, the
    logits for the running train accuracy) and are reduced and read back once an epoch.
    The gradient norm on the job's logged steps (log_every_steps), as the trainer does."""
    data = load_split(spec, device)
    torch.manual_seed(spec.seed)
    model = bench_mlp(data.n_features, data.n_classes, device)
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=spec.optimizer.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    n = len(data.x_train)
    steps = 0
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(spec.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        losses, norm_parts, lrs, logits_seen = [], [], [], []
        for i in range(0, n, spec.batch_size):
            batch = order[i : i + spec.batch_size]
            logits = model(data.x_train[batch])
            loss = nn.functional.cross_entropy(logits, data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if steps % spec.log_every_steps == 0:  # the job's logged steps
                norm_parts.extend(torch._foreach_norm([p.grad for p in params]))
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            losses.append(loss.detach())
            logits_seen.append(logits.detach())
            steps += 1
        with torch.no_grad():
            grad_norms = torch.linalg.vector_norm(torch.stack(norm_parts).reshape(-1, len(params)), dim=1)
            train_acc = (torch.cat(logits_seen).argmax(dim=1) == data.y_train[order]).float().mean()
            model.eval()
            logits = model(data.x_val)
            val_loss = nn.functional.cross_entropy(logits, data.y_val)
            val_acc = (logits.argmax(dim=1) == data.y_val).float().mean()
            model.train()
            torch.stack(losses).tolist(), grad_norms.tolist(), torch.stack([train_acc, val_loss, val_acc]).tolist()
    sync(device)
    return steps, time.perf_counter() - start, time.process_time() - cpu_start


def descent_trainer(spec: JobSpec, client, experiment_id: str) -> tuple[int, float, float, float]:  # noqa: ANN001
    run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=1.0, buffer_limit=10_000_000)
    trainer = Trainer(spec, JobReporter(sink))
    trainer.setup()
    sync(trainer.device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = trainer.train()
    sync(trainer.device)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    flush_start = time.perf_counter()
    sink.close()
    flush = time.perf_counter() - flush_start
    client.set_terminated(run_id)
    return result.steps, elapsed, cpu, flush


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def mlflow_server(isolate: bool, port: int = 5077) -> Iterator[tuple[object, str]]:
    """A real MLflow server (SQLite store, in a temporary home) and an experiment in it:
    (client, experiment_id). Isolated: the server is pinned to the last core and this
    process (and torch's threads) to the others, as when the server runs on its own host."""
    from mlflow.tracking import MlflowClient

    cores = sorted(os.sched_getaffinity(0))
    server_prefix: list[str] = []
    if isolate:
        server_prefix = ["taskset", "-c", str(cores[-1])]
        os.sched_setaffinity(0, cores[:-1])
        torch.set_num_threads(len(cores) - 1)
    with tempfile.TemporaryDirectory() as home:
        s = Settings(descent_home=Path(home), mlflow_port=port)
        group = ProcessGroup(log_dir=Path(home) / "logs", env={"PATH": "/usr/bin:/bin"})
        server = group.start("mlflow", server_prefix + mlflow_command(s))
        try:
            wait_http(f"{s.mlflow_tracking_uri}/health", server, timeout_s=120)
            client = MlflowClient(s.mlflow_tracking_uri)
            yield client, client.create_experiment("bench")
        finally:
            group.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 100 epochs (2,300 steps, a few seconds): long enough for the sink to send batches while
    # training, as it does in a job (it flushes every second).
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-every", type=int, default=1, help="the job's log_every_steps")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=os.cpu_count() >= 2)
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    spec = JobSpec.model_validate(
        {"name": "bench", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
         "optimizer": {"name": "adam", "lr": 0.001}, "epochs": args.epochs, "batch_size": 64,
         "device": args.device, "log_every_steps": args.log_every}
    )  # fmt: skip
    device = resolve_device(spec.device)

    with mlflow_server(args.isolate) as (client, experiment_id):
        bare_rates, same_rates, descent_rates, flushes = [], [], [], []
        cpu_rates: dict[str, list[float]] = {"bare": [], "same": [], "descent": []}
        bare_loop(spec, device)  # warm-up: first-call costs land in no measurement
        same_metrics_loop(spec, device)
        sides = ["bare", "same", "descent"]
        for round_ in range(args.rounds):
            # Which side runs first rotates, so that none gains from its place.
            for side in sides[round_ % 3 :] + sides[: round_ % 3]:
                if side == "bare":
                    steps, elapsed, cpu = bare_loop(spec, device)
                    bare_rates.append(steps / elapsed)
                elif side == "same":
                    steps, elapsed, cpu = same_metrics_loop(spec, device)
                    same_rates.append(steps / elapsed)
                else:
                    steps, elapsed, cpu, flush = descent_trainer(spec, client, experiment_id)
                    descent_rates.append(steps / elapsed)
                    flushes.append(flush)
                cpu_rates[side].append(steps / cpu)

    bare, same, descent = (statistics.median(r) for r in (bare_rates, same_rates, descent_rates))
    ratios = [d / b for d, b in zip(descent_rates, bare_rates)]
    same_ratios = [d / b for d, b in zip(descent_rates, same_rates)]
    where = f"MLflow server pinned to core {cores[-1]}, training on {cores[:-1]}" if args.isolate else "all share"
    print(f"device: {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  ({where})")
    print(f"job: digits, MLP [128, 64], adam, batch 64, {steps} steps, per-step metrics every {args.log_every} step(s)")
    print(f"minimal loop           {bare:9.0f} steps/s   (rounds: {', '.join(f'{r:.0f}' for r in bare_rates)})")
    print(f"same-metrics loop      {same:9.0f} steps/s   (rounds: {', '.join(f'{r:.0f}' for r in same_rates)})")
    print(f"Descent trainer+MLflow {descent:9.0f} steps/s   (rounds: {', '.join(f'{r:.0f}' for r in descent_rates)})")
    print(f"ratio vs same-metrics loop: {statistics.median(same_ratios):.3f}   "
          f"(median of paired rounds; min {min(same_ratios):.3f}, max {max(same_ratios):.3f})")
    print(f"ratio vs minimal loop: {statistics.median(ratios):.3f}   "
          f"(median of paired rounds; min {min(ratios):.3f}, max {max(ratios):.3f})")
    cpu_same = statistics.median(d / b for d, b in zip(cpu_rates["descent"], cpu_rates["same"]))
    cpu_bare = statistics.median(d / b for d, b in zip(cpu_rates["descent"], cpu_rates["bare"]))
    # Steps per CPU-second of the training process (its every thread, the sink's included):
    # the cost ratio, which other processes' load on the machine disturbs far less than the wall clock.
    print(f"by process CPU time: vs same-metrics {cpu_same:.3f}, vs minimal {cpu_bare:.3f}   "
          f"(steps per CPU-second: {', '.join(f'{k} {statistics.median(v):.0f}' for k, v in cpu_rates.items())})")
    print(f"final MLflow flush after the loop: median {statistics.median(flushes):.2f} s")


if __name__ == "__main__":
    main()
