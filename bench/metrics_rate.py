"""Metrics at fleet rates: what one MLflow server process absorbs, what happens past it,
and the per-job rule (METRICS_MAX_POINTS_PER_S) that keeps a fleet of fast jobs under it.

Starts a real `mlflow server` (one process, `--workers 1`, as `make up` and compose run
it) with a fresh PostgreSQL store, then, in one run:

1. the ceiling: S sender processes, each with Descent's own MlflowMetricSink (rule off:
   every point), offer rising totals of points/s (3-metric rows every 20 ms) for a few
   seconds a level. Per level: points/s absorbed, the server's CPU per point, the sinks'
   queues at the level's end, how long they took to drain after it (the lag), and the
   points dropped (a sink keeps at most `--buffer-limit` points, as METRICS_BUFFER_LIMIT:
   the oldest go first once it is full);
2. the rule: 8 concurrent jobs of the digits MLP (Descent's Trainer, one process and one
   torch thread each, started together), rounds alternating between the jobs logging to
   MLflow through the worker's reporter and sink under METRICS_MAX_POINTS_PER_S, and the
   same jobs logging nothing (NullReporter). Per round: steps/s of each job, the processes'
   CPU per step, the lag at the end (close of the sink), and, for the logging rounds, each
   run's curves read back from MLflow and checked against the rule: every step in exactly
   one point of train_loss, lr and grad_norm, windows where the run's metrics_window_steps
   says, min <= mean <= max.

With --isolate (the default on >= 2 cores) the server is pinned to the last core and the
senders and trainers to the others, as when it runs on its own host; PostgreSQL is a
system service and is not pinned. Figures on a shared machine are noisy: paired rounds.

The jobs of part 2 should be in the regime of the issue (each ~1,000 steps/s, 64-step
windows at the default 150 points/s). A machine with fewer cores than jobs runs each far
slower, where the rule keeps every step (under 50 steps/s); scale the limit with the speed
there (`--max-points-per-s 6 --burst-s 5` for jobs at ~25 steps/s: 32-64-step windows) and
say so, as README "Metrics at fleet rates" does.

The last lines are `mlflow server ceiling: <points/s> points/s` and
`8 jobs with metrics vs none: <ratio>`.

  PYTHONPATH=$PWD .venv/bin/python bench/metrics_rate.py [--levels 2000,4000,...] [--jobs 8] [--rounds 3] [--epochs 60]

Needs PostgreSQL (TEST_PG_HOST/PORT/USER, default 127.0.0.1:5432 postgres) as the
integration tests do.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import PG_HOST, PG_PORT, PG_USER, admin_sql, free_port  # noqa: E402
from jobs.settings import Settings, settings as default_settings  # noqa: E402
from launcher.processes import ProcessGroup, mlflow_command, wait_http  # noqa: E402
from worker.metrics_rule import SPREAD_METRICS, WINDOW_METRIC, point_steps, window_metric_name  # noqa: E402

# (MLflow's client prints a link to stdout at each run's end; the spawned senders and jobs inherit this.)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
SEND_EVERY_S = 0.02
DIGITS_JOB = {
    "name": "metrics-rate", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
    "optimizer": {"name": "adam", "lr": 0.001}, "batch_size": 64, "device": "cpu",
}  # fmt: skip


# -- 1. the ceiling: sender processes


def sender(uri: str, experiment_id: str, cores: list[int], buffer_limit: int, commands, results) -> None:  # noqa: ANN001
    """One sink (rule off), fed `rate` points/s in 3-metric rows for `seconds`, per command."""
    os.sched_setaffinity(0, cores)
    from mlflow.tracking import MlflowClient

    from worker.metrics_sink import MlflowMetricSink

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=1.0, buffer_limit=buffer_limit)
    step = 0
    while (command := commands.get()) is not None:
        rate, seconds = command
        start = time.monotonic()
        sent0, dropped0, first = sink.sent, sink.dropped, step
        while (now := time.monotonic()) < start + seconds:
            n = int((now - start) * rate / 3) - (step - first)  # rows due by now
            if n > 0:
                sink.add_rows([(s, {"train_loss": 1.0 / (s + 1), "lr": 0.001, "grad_norm": 0.5})
                               for s in range(step, step + n)])  # fmt: skip
                step += n
            time.sleep(SEND_EVERY_S)
        offered_s = time.monotonic() - start
        sent_during, pending_at_end = sink.sent - sent0, len(sink._pending)
        while sink._pending and time.monotonic() < start + seconds + 120:  # drain: the lag at the end
            time.sleep(0.05)
        drain_s = time.monotonic() - start - offered_s
        results.put((sent_during / offered_s, pending_at_end, drain_s, sink.dropped - dropped0, sink.added))
    sink.close()
    client.set_terminated(run_id)


def ceiling(uri: str, experiment_id: str, server_pid: int, database: str, levels: list[int], senders: int, seconds: float,
            cores: list[int], buffer_limit: int) -> list[tuple]:  # fmt: skip
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(senders)]
    results = ctx.Queue()
    procs = [ctx.Process(target=sender, args=(uri, experiment_id, cores, buffer_limit, q, results)) for q in commands]
    for p in procs:
        p.start()
    server = psutil.Process(server_pid)
    rows = []
    try:
        for level in levels:
            cpu0, pg0 = server_cpu(server), postgres_cpu(database)
            t0 = time.monotonic()
            for q in commands:
                q.put((level / senders, seconds))
            got = [results.get(timeout=seconds + 300) for _ in procs]
            wall = time.monotonic() - t0
            cpu = server_cpu(server) - cpu0
            pg = sum(v - pg0.get(pid, 0.0) for pid, v in postgres_cpu(database).items())
            absorbed = sum(g[0] for g in got)
            total_points = sum(g[0] for g in got) * seconds + sum(g[1] for g in got)
            points = max(total_points, 1)
            rows.append((level, absorbed, cpu / wall, cpu / points * 1e6, sum(g[1] for g in got),
                         max(g[2] for g in got), sum(g[3] for g in got), pg / points * 1e6))  # fmt: skip
            print(f"  offered {level:6d} points/s: absorbed {absorbed:7.0f} points/s, server CPU "
                  f"{rows[-1][2] * 100:4.0f} % ({rows[-1][3]:.0f} us a point; PostgreSQL {rows[-1][7]:.0f} us), queued at the end "
                  f"{rows[-1][4]:7d} points, lag at the end {rows[-1][5]:5.1f} s, dropped {rows[-1][6]}", flush=True)  # fmt: skip
    finally:
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=120)
    return rows


def server_cpu(server: psutil.Process) -> float:
    total = 0.0
    for p in [server, *server.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def postgres_cpu(database: str) -> dict[int, float]:
    """{pid: CPU seconds} of the PostgreSQL backends serving the MLflow store."""
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres") as conn:
        pids = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)).fetchall()
    used = {}
    for (pid,) in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        used[pid] = t.user + t.system
    return used


# -- 2. the rule: concurrent digits jobs


def trainer_job(uri: str | None, experiment_id: str | None, epochs: int, seed: int, cores: list[int],
                max_points_per_s: float, burst_s: float, barrier, results) -> None:  # fmt: skip
    os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(1)
    from jobs.spec import JobSpec
    from trainer.recipe import Trainer
    from trainer.reporting import NullReporter

    spec = JobSpec.model_validate(DIGITS_JOB | {"epochs": epochs, "seed": seed})
    sink = run_id = None
    if uri is not None:
        from mlflow.tracking import MlflowClient

        from worker.metrics_sink import MlflowMetricSink
        from worker.monitor import JobReporter

        client = MlflowClient(uri)
        run_id = client.create_run(experiment_id).info.run_id
        sink = MlflowMetricSink(client, lambda: (run_id, {}), flush_interval_s=1.0, buffer_limit=1_000_000,
                                max_points_per_s=max_points_per_s, burst_points=max_points_per_s * burst_s)  # fmt: skip
        reporter = JobReporter(sink)
    else:
        reporter = NullReporter()
    trainer = Trainer(spec, reporter)
    trainer.setup()
    barrier.wait()  # every job starts training at once
    start, cpu0 = time.perf_counter(), time.process_time()
    result = trainer.train()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    lag = 0.0
    if sink is not None:
        lag_start = time.perf_counter()
        sink.close()
        lag = time.perf_counter() - lag_start
        client.set_terminated(run_id)
    results.put((seed, result.steps, elapsed, cpu, lag, run_id, sink.dropped if sink else 0))


def concurrent_round(uri: str | None, experiment_id: str | None, jobs: int, epochs: int, cores: list[int],
                     max_points_per_s: float, burst_s: float) -> list[tuple]:  # fmt: skip
    # Forked from this process, which imported torch, the trainer and MLflow's client once (as a
    # Celery parent does; no torch thread exists before the fork): a job starts in a second, not
    # in a minute of imports on a busy machine.
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=trainer_job, args=(uri, experiment_id, epochs, seed, cores, max_points_per_s,
                                                    burst_s, barrier, results)) for seed in range(1, jobs + 1)]  # fmt: skip
    for p in procs:
        p.start()
    got = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return got


def curve_problems(client, run_id: str, total_steps: int) -> tuple[list[str], dict[str, int], set[int]]:  # noqa: ANN001
    """What the run's per-step curves lack under the rule; the points per metric; the window sizes."""
    changes = sorted((m.step, int(m.value)) for m in client.get_metric_history(run_id, WINDOW_METRIC))
    expected_steps, windowed_steps = point_steps(changes, total_steps)
    problems, counts = [], {}
    points = {}
    for key in ("train_loss", "lr", "grad_norm", *(window_metric_name(k, s) for k, st in SPREAD_METRICS.items() for s in st)):
        points[key] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        counts[key] = len(points[key])
    for key in ("train_loss", "lr", "grad_norm"):
        if [s for s, _ in points[key]] != expected_steps:
            problems.append(f"{key}: {len(points[key])} points, expected {len(expected_steps)} under the rule")
    for key in (window_metric_name(k, s) for k, st in SPREAD_METRICS.items() for s in st):
        if [s for s, _ in points[key]] != windowed_steps:
            problems.append(f"{key}: {len(points[key])} points, expected {len(windowed_steps)}")
    mean = dict(points["train_loss"])
    low, high = dict(points["train_loss_window_min"]), dict(points["train_loss_window_max"])
    if any(not low[s] - 1e-9 <= mean[s] <= high[s] + 1e-9 for s in low if s in mean and s in high):
        problems.append("train_loss outside its window's min..max")
    return problems, counts, {1} | {size for _, size in changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1000,2000,3000,4000,6000,8000,12000", help="points/s offered, rising")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="each level's length")
    parser.add_argument("--buffer-limit", type=int, default=5_000, help="each sender's sink buffer (points)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds: with metrics, none")
    parser.add_argument("--epochs", type=int, default=40, help="of each digits job (23 steps an epoch)")
    parser.add_argument("--max-points-per-s", type=float, default=default_settings.metrics_max_points_per_s)
    parser.add_argument("--burst-s", type=float, default=default_settings.metrics_burst_s)
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--skip-jobs", action="store_true")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=len(os.sched_getaffinity(0)) >= 2)
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    work_cores = cores[:-1] if args.isolate else cores
    home = Path(tempfile.mkdtemp(prefix="metrics-rate-"))
    database = f"metricsrate_mlflow_{uuid.uuid4().hex[:8]}"
    admin_sql(f'CREATE DATABASE "{database}"')
    s = Settings(descent_home=home, mlflow_port=free_port(),
                 mlflow_backend_store_uri=f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}",
                 mlflow_artifacts_destination=str(home / "mlartifacts"))  # fmt: skip
    prefix = ["taskset", "-c", str(cores[-1])] if args.isolate else []
    group = ProcessGroup(log_dir=home / "logs", env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    ceiling_rows, rounds = [], {"metrics": [], "none": []}
    try:
        server = group.start("mlflow", prefix + mlflow_command(s))
        wait_http(f"{s.mlflow_tracking_uri}/health", server, timeout_s=120)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(s.mlflow_tracking_uri)
        experiment_id = client.create_experiment("metrics-rate")
        where = f"server pinned to core {cores[-1]}, senders and jobs on {work_cores}" if args.isolate else "all share"
        print(f"machine: {len(cores)} cores ({where}); mlflow server --workers 1, PostgreSQL store; "
              f"load average {os.getloadavg()[0]:.1f} at the start (other work on this machine)", flush=True)  # fmt: skip
        if not args.skip_ceiling:
            levels = [int(x) for x in args.levels.split(",")]
            print(f"1. ceiling: {args.senders} senders, {args.seconds:g} s a level, each sink's buffer "
                  f"{args.buffer_limit} points", flush=True)  # fmt: skip
            ceiling_rows = ceiling(s.mlflow_tracking_uri, experiment_id, server.process.pid, database, levels, args.senders,
                                   args.seconds, work_cores, args.buffer_limit)  # fmt: skip
        if not args.skip_jobs:
            import torch  # noqa: F401 - imported before the jobs fork (see concurrent_round)

            import trainer.recipe  # noqa: F401
            import worker.monitor  # noqa: F401
            from jobs.spec import JobSpec

            total_steps = JobSpec.model_validate(DIGITS_JOB | {"epochs": args.epochs}).total_steps
            print(f"2. {args.jobs} concurrent digits jobs, {total_steps} steps each, 1 torch thread each, on cores "
                  f"{work_cores}; METRICS_MAX_POINTS_PER_S {args.max_points_per_s:g}, METRICS_BURST_S {args.burst_s:g}",
                  flush=True)  # fmt: skip
            incomplete = 0
            for r in range(args.rounds):
                for side in (("metrics", "none") if r % 2 == 0 else ("none", "metrics")):
                    uri = s.mlflow_tracking_uri if side == "metrics" else None
                    got = concurrent_round(uri, experiment_id, args.jobs, args.epochs, work_cores, args.max_points_per_s,
                                           args.burst_s)  # fmt: skip
                    rates = [steps / elapsed for _, steps, elapsed, *_ in got]
                    cpu_per_step = statistics.mean(cpu / steps * 1e6 for _, steps, _, cpu, *_ in got)
                    line = (f"  round {r + 1} {side:>7}: steps/s per job {statistics.mean(rates):6.0f} "
                            f"(min {min(rates):.0f}, max {max(rates):.0f}; sum {sum(rates):.0f}), "
                            f"CPU {cpu_per_step:.0f} us a step")  # fmt: skip
                    if side == "metrics":
                        lags = [g[4] for g in got]
                        checks = [curve_problems(client, g[5], total_steps) for g in got]
                        bad = [p for p, _, _ in checks if p]
                        incomplete += len(bad)
                        counts = checks[0][1]
                        sizes = sorted(set().union(*(z for _, _, z in checks)))
                        line += (f", lag at the end max {max(lags):.2f} s, dropped {sum(g[6] for g in got)}, "
                                 f"curves complete under the rule {len(got) - len(bad)}/{len(got)} "
                                 f"(window sizes {sizes}; job 1: {counts['train_loss']} train_loss points "
                                 f"for {total_steps} steps)")  # fmt: skip
                        for problems in bad[:3]:
                            line += "\n    " + "; ".join(problems)
                        tags = client.get_run(got[0][5]).data.tags
                        line += f"\n    tag descent.metrics_rule (job 1): {tags.get('descent.metrics_rule')!r}"
                    rounds[side].append((statistics.mean(rates), cpu_per_step, got))
                    print(line, flush=True)
    finally:
        group.stop_all()
        admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    if ceiling_rows:
        top = max(r[1] for r in ceiling_rows)
        per_point = statistics.median(r[3] for r in ceiling_rows)
        pg_point = statistics.median(r[7] for r in ceiling_rows)
        print(f"server CPU per point absorbed: median {per_point:.0f} us over the levels (PostgreSQL {pg_point:.0f} us): "
              f"one server process with a core of its own absorbs {1e6 / per_point:.0f} points/s")
        fleet = 32 * args.max_points_per_s
        print(f"32 jobs at METRICS_MAX_POINTS_PER_S {args.max_points_per_s:g}: {fleet:.0f} points/s = "
              f"{fleet * per_point / 1e6:.0%} of a server process with a core of its own, "
              f"{fleet / top:.0%} of what it absorbed here")  # fmt: skip
        print(f"mlflow server ceiling: {top:.0f} points/s")
    if rounds["metrics"] and rounds["none"]:
        ratios = [m[0] / n[0] for m, n in zip(rounds["metrics"], rounds["none"])]
        cpu_ratios = [n[1] / m[1] for m, n in zip(rounds["metrics"], rounds["none"])]
        print(f"by CPU time (steps per CPU-second of the jobs' processes, sinks included): "
              f"{statistics.median(cpu_ratios):.3f}")  # fmt: skip
        print(f"8 jobs with metrics vs none: {statistics.median(ratios):.3f}   (paired rounds: "
              + ", ".join(f"{r:.3f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
