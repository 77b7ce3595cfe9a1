"""What a job costs beyond its training, and what jobs sharing a machine cost each other.

Starts its own stack the way `make up` does with PostgreSQL and Redis (fresh PostgreSQL
databases, a private Redis queue, an `mlflow server` with a PostgreSQL store, the API,
one worker with two job slots, the reaper), then measures side by side in one run:

1. in-process: the 5-epoch digits MLP job's `Trainer.setup()` + `train()`, called in
   this process (warm, with the torch thread count a job gets), five times before the
   jobs through the API and five times after them (the machine's speed drifts), median;
2. through the API: the same job submitted N times in a row, each once the previous
   one succeeded: end to end (POST to `succeeded` seen by polling), the server-side
   parts (submit -> running, running -> first metric, first -> last metric, last metric
   -> succeeded, from the job's timestamps and its MLflow metric history), submit ->
   running p50/p95, and whether each run was complete (metrics, params, tags, spec,
   confusion matrix, model, FINISHED) when the job said `succeeded`;
3. concurrent jobs: a longer digits job alone, then two at once, steps/s of each (from
   the MLflow metric timestamps), alternating;
4. a study of 16 digits trials (8 learning rates x 2 seeds, parallelism 2): wall time
   against the trials' pure training time (16 x the in-process figure, timed again five
   times right before the study and five times right after it); each trial's
   timeline (created -> started -> first metric -> last metric -> finished), the gap
   between a round having trained and the next round (the next trials created, then
   claimed) and how far the next round overlaps the last one's uploads, the
   CPU each kind of process used, and the requests the MLflow server answered.

The last two lines are `api overhead per job: <seconds> s` and
`two concurrent jobs, each vs alone: <ratio>`.

  PYTHONPATH=$PWD .venv/bin/python bench/job_cost.py [--quick | --study-only] [--jobs 50] [--pairs 2] [--fresh-process-per-job]
      [--mlflow-auth [--mlflow-auth-cache-s S]]

--fresh-process-per-job runs the worker as it runs with a CUDA build of torch (a new
process for every job, FRESH_PROCESS_PER_JOB=true), to measure what that costs on CPU.
--mlflow-auth runs MLflow's basic-auth app as docker-compose does (deploy/mlflow-auth.ini,
the stack logging in as its admin); --mlflow-auth-cache-s 0 turns its credential cache off.

Needs PostgreSQL (TEST_PG_HOST/PORT/USER, default 127.0.0.1:5432 postgres) and Redis
(TEST_REDIS_URL, default redis://127.0.0.1:6379/15), as the integration tests do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scratch import bench_stack, database_backends  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from trainer.recipe import Trainer  # noqa: E402

CONCURRENCY = 2  # the worker's job slots: the concurrent jobs and the study's parallelism
POLL_S = 0.01

SHORT_JOB = {
    "name": "job-cost", "dataset": {"name": "digits"}, "model": {"arch": "mlp", "hidden": [128, 64]},
    "optimizer": {"name": "adam", "lr": 0.001}, "epochs": 5, "batch_size": 64, "seed": 1,
}  # fmt: skip
STUDY_LRS = [0.0003, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02]
EXPECTED_ARTIFACTS = {"spec.yaml", "confusion_matrix.json", "confusion_matrix.png"}


def in_process(spec: JobSpec, repeats: int) -> list[float]:
    """Seconds of setup + train, warm (the first call is not counted)."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        trainer = Trainer(spec)
        trainer.setup()
        trainer.train()
        if i:
            times.append(time.perf_counter() - start)
    return times


class Bench:
    def __init__(self, api: httpx.Client, settings: Settings) -> None:
        from mlflow.tracking import MlflowClient

        self.api = api
        self.mlflow = MlflowClient(settings.mlflow_tracking_uri)

    def submit(self, spec: dict) -> tuple[str, float]:
        sent = time.perf_counter()
        response = self.api.post("/v1/jobs", json=spec)
        response.raise_for_status()
        return response.json()["id"], sent

    def wait(self, job_id: str, timeout_s: float = 600) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
                return job
            time.sleep(POLL_S)
        raise TimeoutError(f"job {job_id} did not end within {timeout_s} s")

    def completeness(self, run_id: str) -> list[str]:
        """What the run lacks, read right after the job said `succeeded`."""
        run = self.mlflow.get_run(run_id)
        missing = [] if run.info.status == "FINISHED" else [f"status {run.info.status}"]
        if not {"train_loss", "val_accuracy", "epoch"} <= set(run.data.metrics):
            missing.append("metrics")
        if "optimizer.name" not in run.data.params:
            missing.append("params")
        if "descent.job_id" not in run.data.tags:
            missing.append("tags")
        artifacts = {a.path for a in self.mlflow.list_artifacts(run_id)}
        missing += sorted(EXPECTED_ARTIFACTS - artifacts)
        models = self.mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run_id}'")  # fmt: skip
        if not models:
            missing.append("model")
        return missing

    def metric_span(self, run_id: str) -> tuple[float, float, int]:
        """(first, last) train_loss timestamps in seconds since the epoch, and the steps between."""
        history = sorted(self.mlflow.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
        return history[0].timestamp / 1000, history[-1].timestamp / 1000, history[-1].step - history[0].step

    def steps_per_s(self, run_id: str) -> float:
        first, last, steps = self.metric_span(run_id)
        return steps / (last - first)


def sequential_jobs(bench: Bench, n: int) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = {k: [] for k in ("e2e", "server", "claim", "to_metric", "train", "to_end",
                                                     "to_trained", "results")}  # fmt: skip
    incomplete = []
    for _ in range(n):
        job_id, sent = bench.submit(SHORT_JOB)
        job = bench.wait(job_id)
        parts["e2e"].append(time.perf_counter() - sent)
        missing = bench.completeness(job["mlflow"]["run_id"])
        if missing:
            incomplete.append((job_id, missing))
        first, last, _ = bench.metric_span(job["mlflow"]["run_id"])
        created, started, trained, finished = (datetime.fromisoformat(job[k]).timestamp()
                                               for k in ("created_at", "started_at", "trained_at", "finished_at"))  # fmt: skip
        parts["server"].append(finished - created)
        parts["claim"].append(started - created)
        parts["to_metric"].append(first - started)
        parts["train"].append(last - first)
        parts["to_end"].append(finished - last)
        parts["to_trained"].append(trained - last)  # the last step to the training's end: the final evaluation
        parts["results"].append(finished - trained)  # the results and last points into MLflow, the run's and job's end
    parts["incomplete"] = incomplete  # type: ignore[assignment]
    return parts


def concurrent_ratio(bench: Bench, epochs: int, pairs: int) -> tuple[list[float], list[list[float]]]:
    spec = SHORT_JOB | {"name": "job-cost-long", "epochs": epochs}
    alone, together = [], []
    for _ in range(pairs):
        job_id, _ = bench.submit(spec)
        alone.append(bench.steps_per_s(bench.wait(job_id)["mlflow"]["run_id"]))
        ids = [bench.submit(spec | {"seed": seed})[0] for seed in (2, 3)]
        together.append([bench.steps_per_s(bench.wait(i)["mlflow"]["run_id"]) for i in ids])
    return alone, together


def stack_cpu(databases: list[str]) -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} of the stack's processes (this one's descendants)
    and of the PostgreSQL backends serving its databases."""
    import psutil

    used: dict[int, tuple[str, float]] = {}

    def add(kind: str, process: psutil.Process) -> None:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended meanwhile
            return
        used[process.pid] = (kind, times.user + times.system)

    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        kind = next((k for k, marker in (("worker", "celery"), ("reaper", "worker.reaper"), ("mlflow", "mlflow"),
                                         ("api", "api")) if marker in command), "other")  # fmt: skip
        add(kind, process)
    for pid in database_backends(databases):
        try:
            add("postgres", psutil.Process(pid))
        except psutil.Error:
            continue
    return used


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds by kind of process between two snapshots, of the processes alive at the
    second (one that ended in between is not counted)."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        used[kind] = used.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    return dict(sorted(used.items()))


def mlflow_requests(log: Path, offset: int) -> int:
    """Requests in the MLflow server's access log after byte `offset` (uvicorn logs each one),
    once the log has been quiet for a second (the study's report is written after its end)."""
    size, quiet_since, deadline = log.stat().st_size, time.monotonic(), time.monotonic() + 30
    while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline:
        time.sleep(0.2)
        if (now := log.stat().st_size) != size:
            size, quiet_since = now, time.monotonic()
    with log.open("rb") as lines:
        lines.seek(offset)
        return sum(1 for line in lines if b' HTTP/1.1" ' in line and b"/health" not in line)


def study_wall(bench: Bench, repeats: int) -> tuple[float, int, str]:
    study = {
        "name": f"job-cost-{uuid.uuid4().hex[:6]}",
        "base": {k: v for k, v in SHORT_JOB.items() if k not in ("name", "optimizer")}
        | {"optimizer": {"name": "adam", "lr": 0.001}},
        "space": {"optimizer.lr": {"grid": STUDY_LRS}},
        "search": {"method": "grid", "parallelism": CONCURRENCY},
        "repeats": repeats,
        "objective": {"metric": "val_accuracy", "target": 0.5},
    }
    start = time.perf_counter()
    response = bench.api.post("/v1/studies", json=study)
    response.raise_for_status()
    study_id = response.json()["id"]
    # Its end, as a client watching it sees it: the event stream closes after the study's
    # final state. (Polling GET every 50 ms, as before, cost the API ~0.6 s of CPU during
    # a 4.6 s study on 2 cores: the measurement slowed what it measured.)
    with bench.api.stream("GET", f"/v1/studies/{study_id}/events", timeout=600) as events:
        events.raise_for_status()
        for _ in events.iter_lines():
            pass
    wall = time.perf_counter() - start
    body = bench.api.get(f"/v1/studies/{study_id}").json()
    if body["status"] != "succeeded":
        raise RuntimeError(f"study ended {body['status']}: {body}")
    return wall, sum(body["trials"].values()), study_id


def study_rounds(bench: Bench, study_id: str) -> dict[str, list[float]]:
    """A round is a configuration's trials (its seeds start together). From the jobs' own
    timestamps and their runs' metric histories (read after the study): each trial's
    `queued` (created -> started), `to_metric` (started -> its first train_loss point),
    `train` (first -> last point), `to_end` (last point -> finished: its last metrics,
    results and run's end, the job's end) and `trial` (started -> finished); `move_on` the
    last trial of a round trained (`trained_at`: it gives its place back then, its results
    still on their way to MLflow) -> the first of the next round started, split into
    `advance` (-> the next round's first trial created: Optuna told and asked, the trials
    created and enqueued) and `claim` (-> started); `overlap` a round's last trial finished
    -> the next round's first started (negative: the next round trained while this one's
    results went to MLflow). Where configurations overlap in training, a slot freed (a
    trial trained) -> the next trial started in it."""
    jobs = bench.api.get("/v1/jobs", params={"study_id": study_id, "limit": 100}).json()["items"]
    rounds: dict[str, list[tuple[float, float, float, float]]] = {}
    parts: dict[str, list[float]] = {k: [] for k in ("queued", "to_metric", "train", "to_end")}
    for job in jobs:
        created, started, trained, finished = (datetime.fromisoformat(job[k]).timestamp()
                                               for k in ("created_at", "started_at", "trained_at", "finished_at"))  # fmt: skip
        rounds.setdefault(job["study"]["config_id"], []).append((created, started, trained, finished))
        first, last, _ = bench.metric_span(job["mlflow"]["run_id"])
        parts["queued"].append(started - created)
        parts["to_metric"].append(first - started)
        parts["train"].append(last - first)
        parts["to_end"].append(finished - last)
    ordered = sorted(rounds.values(), key=lambda spans: min(span[1] for span in spans))
    pairs = list(zip(ordered, ordered[1:]))
    first_started = [min(span[1] for span in after) for _, after in pairs]
    last_trained = [max(span[2] for span in before) for before, _ in pairs]
    move_on = [start - trained for start, trained in zip(first_started, last_trained)]
    advance = [min(span[0] for span in after) - trained for (_, after), trained in zip(pairs, last_trained)]
    claim = [start - min(span[0] for span in after) for (_, after), start in zip(pairs, first_started)]
    overlap = [start - max(span[3] for span in before) for (before, _), start in zip(pairs, first_started)]
    if any(gap < 0 for gap in move_on):  # configurations overlap (one seed each): a slot is the unit, not a round
        starts = sorted(span[1] for spans in ordered for span in spans)
        trained = sorted(span[2] for spans in ordered for span in spans)
        move_on = [start - end for start, end in zip(starts[CONCURRENCY:], trained)]  # the k-th trained frees a slot
        advance, claim, overlap = [], [], []
    return {"trial": [span[3] - span[1] for spans in ordered for span in spans], "move_on": move_on,
            "advance": advance, "claim": claim, "overlap": overlap} | parts  # fmt: skip


def row(label: str, values: list[float]) -> str:
    return (f"  {label:<34} median {statistics.median(values):6.3f} s   p95 {percentile(values, 95):6.3f} s   "
            f"max {max(values):6.3f} s")  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer jobs (20), one pair, an 8-trial study")
    parser.add_argument("--jobs", type=int, help="sequential short jobs (default 50; --quick 20)")
    parser.add_argument("--pairs", type=int, help="alone/together rounds of the concurrent test (default 2; --quick 1)")
    parser.add_argument("--study-only", action="store_true",
                        help="only the study (after 4 jobs in a row and one pair, to warm the worker)")  # fmt: skip
    parser.add_argument("--long-epochs", type=int, default=60, help="epochs of the concurrent test's job")
    parser.add_argument("--mlflow-auth", action="store_true",
                        help="MLflow runs its basic-auth app, as docker-compose runs it (deploy/mlflow-auth.ini)")  # fmt: skip
    parser.add_argument("--mlflow-auth-cache-s", type=int,
                        help="with --mlflow-auth: its credential cache in seconds instead of the file's (0: none)")  # fmt: skip
    parser.add_argument("--fresh-process-per-job", action="store_true",
                        help="the worker runs each job in a new process, as it does with a CUDA build")  # fmt: skip
    args = parser.parse_args()
    n_jobs = args.jobs or (4 if args.study_only else 20 if args.quick else 50)
    pairs = args.pairs or (1 if args.quick or args.study_only else 2)
    study_repeats = 1 if args.quick else 2
    long_epochs = 5 if args.study_only else args.long_epochs

    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // CONCURRENCY)  # what a job of the stack's worker gets by default
    torch.set_num_threads(threads)
    spec = JobSpec.model_validate(SHORT_JOB)
    local_times = in_process(spec, repeats=5)  # and as many after the jobs: the machine's speed drifts

    overrides = {"fresh_process_per_job": True} if args.fresh_process_per_job else {}
    with bench_stack("job-cost", CONCURRENCY, mlflow_auth=args.mlflow_auth, mlflow_auth_cache_s=args.mlflow_auth_cache_s,
                     **overrides) as stack:  # fmt: skip
        settings, databases = stack.settings, stack.databases
        bench = Bench(stack.api, settings)
        seq = sequential_jobs(bench, n_jobs)
        local_times += in_process(spec, repeats=5)
        alone, together = concurrent_ratio(bench, long_epochs, pairs)
        mlflow_log = settings.descent_home / "logs" / "mlflow.log"
        log_offset = mlflow_log.stat().st_size
        # The study's pure training is timed right around it: the machine's speed drifts over
        # the minutes the jobs above take (in-process moved 0.09-0.17 s in one hour here).
        study_local = in_process(spec, repeats=5)
        cpu_before = stack_cpu(databases)
        wall, trials, study_id = study_wall(bench, study_repeats)
        cpu_after = stack_cpu(databases)
        requests = mlflow_requests(mlflow_log, log_offset)  # (before the bench's own reads of the runs)
        study_local += in_process(spec, repeats=5)  # (once its report is written: the log is quiet)
        rounds = study_rounds(bench, study_id)

    local = statistics.median(local_times)
    overhead = statistics.median(seq["e2e"]) - local
    ratios = [statistics.mean(pair) / a for a, pair in zip(alone, together)]
    pure = trials * statistics.median(study_local)
    processes = "a new process per job" if args.fresh_process_per_job else "processes as the worker chooses"
    auth = "no login (make up's default)"
    if args.mlflow_auth:
        cache = "the file's" if args.mlflow_auth_cache_s is None else f"{args.mlflow_auth_cache_s} s"
        auth = f"basic-auth app as docker-compose runs it, credential cache {cache}"
    print(f"machine: {cores} cores, torch {torch.__version__}, {threads} torch thread(s) per job "
          f"(worker concurrency {CONCURRENCY}), {processes}; MLflow: {auth}; logs in {settings.descent_home / 'logs'}")  # fmt: skip
    print(f"short job: digits, MLP [128, 64], adam, {spec.epochs} epochs ({spec.total_steps} steps)")
    print(row("in-process (setup + train)", local_times))
    print(row(f"through the API ({n_jobs} jobs in a row)", seq["e2e"]))
    print(row("  server side: created -> finished", seq["server"]))
    print(row("  submit -> running", seq["claim"]))
    print(row("  running -> first metric", seq["to_metric"]))
    print(row("  first -> last metric", seq["train"]))
    print(row("  last metric -> succeeded", seq["to_end"]))
    print(row("    last metric -> trained", seq["to_trained"]))
    print(row("    trained -> succeeded", seq["results"]))
    complete = n_jobs - len(seq["incomplete"])
    print(f"  runs complete when the job said succeeded: {complete}/{n_jobs}"
          + "".join(f"\n    {job}: missing {', '.join(m)}" for job, m in seq["incomplete"]))  # fmt: skip
    print(f"submit -> running: p50 {statistics.median(seq['claim']) * 1000:.0f} ms, "
          f"p95 {percentile(seq['claim'], 95) * 1000:.0f} ms over {n_jobs} jobs")  # fmt: skip
    print(f"concurrent: digits {long_epochs} epochs; alone "
          + ", ".join(f"{a:.0f}" for a in alone) + " steps/s; two at once "
          + ", ".join(f"{p[0]:.0f} + {p[1]:.0f}" for p in together) + " steps/s")  # fmt: skip
    print(f"study: {trials} trials, parallelism {CONCURRENCY}: wall {wall:.1f} s, pure training "
          f"{pure:.1f} s ({trials} x in-process {statistics.median(study_local):.3f} s, timed around the study), "
          f"wall / pure training {wall / pure:.1f}x")  # fmt: skip
    print(row("  a trial: created -> started", rounds["queued"]))
    print(row("    started -> first metric", rounds["to_metric"]))
    print(row("    first -> last metric", rounds["train"]))
    print(row("    last metric -> finished", rounds["to_end"]))
    print(row("  a trial: started -> finished", rounds["trial"]))
    print(row("  move-on: trained -> next start", rounds["move_on"]))
    if rounds["advance"]:
        print(row("    round trained -> next created", rounds["advance"]))
        print(row("    next created -> started", rounds["claim"]))
        print(row("  round's end -> next start", rounds["overlap"]))
    print(f"  MLflow server: {requests} requests during the study, {requests / trials:.1f} a trial "
          "(the study's parent run and its report included)")
    cpu = cpu_between(cpu_before, cpu_after)
    print("  CPU during the study (s; processes alive at its end, PostgreSQL: its backends): "
          + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()) + f"; {sum(cpu.values()) / trials:.3f} s a trial")
    print(f"api overhead per job: {overhead:.3f} s")
    print(f"two concurrent jobs, each vs alone: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
