"""Chaos against the real stack: jobs keep arriving while workers are SIGKILLed at
random, Redis crashes and comes back empty, and the MLflow server is stopped and
started. Every job must still succeed, exactly once: no job lost, none run twice
(no attempt handed on while the process running it still lived, a history of
attempts one after another, every step in MLflow exactly once, one MLflow run,
FINISHED).

The faults are drawn from a seeded random.Random; the seed is printed, and
CHAOS_SEED=<seed> replays the same plan (the timing of a real stack still varies).
"""

from __future__ import annotations

import heapq
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text

from tests.faults.conftest import TERMINAL, ChaosStack

pytestmark = pytest.mark.integration

N_JOBS = 24
WORKER_KILLS = 5
REDIS_DOWN_S = 3.0
MLFLOW_DOWN_S = 6.0
SUBMIT_OVER_S = 30.0  # jobs arrive over at least this long (and until the last fault is due), the first few at once
FIRST_FAULT_AT_S = 4.0
FAULT_GAP_S = (4.0, 9.0)  # between one fault and the next
DEADLINE_S = 180.0  # after the last fault, for every job to end
BUSY_WAIT_S = 10.0  # how long a kill meant for a worker in the middle of a job waits for one

# Short jobs (140 to 320 steps, a few seconds each: long enough that a kill finds one
# running), checkpointed often so that a killed attempt resumes mid-epoch; attempts to
# spare, so that only a bug can fail one.
DATASETS = [
    ({"name": "digits", "val_fraction": 0.2}, 64, (6, 10)),  # 23 steps an epoch
    ({"name": "wine", "val_fraction": 0.2}, 8, (10, 16)),  # 18 steps an epoch
    ({"name": "iris", "val_fraction": 0.2}, 8, (12, 20)),  # 15 steps an epoch
]


def job_spec(rng: random.Random, i: int) -> dict:
    dataset, batch_size, (low, high) = rng.choice(DATASETS)
    return {
        "name": f"chaos-{i:02d}",
        "experiment": "chaos",
        "dataset": dataset,
        "model": {"arch": "mlp", "hidden": [64, 32]},
        "optimizer": rng.choice([{"name": "adam", "lr": 0.002}, {"name": "sgd", "lr": 0.05, "momentum": 0.9}]),
        "schedule": {"name": "constant"},
        "epochs": rng.randint(low, high),
        "batch_size": batch_size,
        "seed": rng.randrange(1000),
        "log_every_steps": 1,
        "checkpoint_every_steps": rng.choice([10, 20, 30]),
        "max_attempts": 20,
    }


@dataclass
class ChaosLog:
    seed: int
    lines: list[str] = field(default_factory=list)
    kills_hitting_a_job: list[str] = field(default_factory=list)  # job ids running in a killed worker

    def say(self, t0: float, message: str) -> None:
        line = f"[chaos {time.monotonic() - t0:6.1f} s] {message}"
        self.lines.append(line)
        print(line, flush=True)


def running_jobs_by_worker(engine) -> dict[int, list[str]]:  # noqa: ANN001
    """{process group (= the Celery parent's pid): [job ids]} of the jobs running now."""
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT id, worker FROM jobs WHERE status IN ('running', 'cancelling') AND worker IS NOT NULL")
        ).all()
    busy: dict[int, list[str]] = {}
    for job_id, worker in rows:
        try:
            pgid = os.getpgid(int(worker.rsplit(":", 1)[1]))
        except (ProcessLookupError, ValueError):
            continue  # already dead: the reaper will notice
        busy.setdefault(pgid, []).append(str(job_id))
    return busy


def kill_a_worker(stack: ChaosStack, engine, rng: random.Random, log: ChaosLog, t0: float,  # noqa: ANN001
                  busy_only: bool) -> bool:
    """SIGKILL a worker (one in the middle of a job when `busy_only`) and start another;
    False, killing nothing, when `busy_only` and no worker is running a job now."""
    workers = sorted(stack.workers(), key=lambda c: c.name)
    busy = running_jobs_by_worker(engine)
    candidates = [w for w in workers if w.process.pid in busy] if busy_only else workers
    if not candidates:
        return False
    victim = rng.choice(candidates)
    jobs = busy.get(victim.process.pid, [])
    pids = stack.kill_worker(victim)
    log.kills_hitting_a_job += jobs
    replacement = stack.start_worker(wait=False)
    log.say(t0, f"SIGKILL {victim.name} ({len(pids)} processes, pids {sorted(pids)}, running {jobs or 'nothing'}); "
                f"started {replacement.name}")  # fmt: skip
    return True


class MlflowOutage(threading.Thread):
    """Stops the MLflow server, waits, starts it again: in the background, so that jobs
    keep arriving and workers keep dying meanwhile (a restart takes a while to answer)."""

    def __init__(self, stack: ChaosStack, log: ChaosLog, t0: float) -> None:
        super().__init__(name="mlflow-outage", daemon=True)
        self.stack, self.log, self.t0 = stack, log, t0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.log.say(self.t0, "MLflow server stopping")
            self.stack.restart_mlflow(down_s=MLFLOW_DOWN_S)
            self.log.say(self.t0, f"MLflow server answering again (down {MLFLOW_DOWN_S:g} s and its restart)")
        except BaseException as exc:  # noqa: BLE001 - raised in the test's thread
            self.error = exc


def run_chaos(stack: ChaosStack, rng: random.Random, log: ChaosLog) -> list[str]:
    """Submit the jobs while the faults happen; the submitted job ids."""
    specs = [job_spec(rng, i) for i in range(N_JOBS)]
    # The faults, in a random order, a few seconds apart, once jobs are going.
    faults = ["kill"] * WORKER_KILLS + ["redis", "mlflow"]
    rng.shuffle(faults)
    gaps = [rng.uniform(*FAULT_GAP_S) for _ in faults]
    # Jobs keep arriving until the last fault is due, so that a late kill still finds work.
    submit_over = max(SUBMIT_OVER_S, FIRST_FAULT_AT_S + sum(gaps[:-1]))
    submit_at = sorted([0.0] * 6 + [rng.uniform(0, submit_over) for _ in range(N_JOBS - 6)])
    timeline: list[tuple[float, str, float]] = []  # (when, what, a busy kill's last chance), earliest first

    engine = create_engine(stack.settings.database_url)
    job_ids: list[str] = []
    outage: MlflowOutage | None = None
    t0 = time.monotonic()
    next_fault_at = FIRST_FAULT_AT_S
    try:
        while submit_at or faults or timeline:
            now = time.monotonic() - t0
            while submit_at and submit_at[0] <= now:
                submit_at.pop(0)
                job_ids.append(stack.submit(specs[len(job_ids)])["id"])
            if faults and now >= next_fault_at:
                fault = faults.pop(0)
                # Mostly a kill of a worker in the middle of a job (that is what must not
                # be lost), waiting a little for one; sometimes of any worker.
                if fault == "kill":
                    fault = "kill-busy" if rng.random() < 0.8 else "kill-any"
                heapq.heappush(timeline, (now, fault, now + BUSY_WAIT_S))
                next_fault_at = now + gaps.pop(0)
            if timeline and timeline[0][0] <= now:
                _, fault, last_chance = heapq.heappop(timeline)
                if fault.startswith("kill"):
                    busy_only = fault == "kill-busy" and now < last_chance
                    if not kill_a_worker(stack, engine, rng, log, t0, busy_only):
                        heapq.heappush(timeline, (now + 0.2, fault, last_chance))  # no job running: soon again
                elif fault == "redis":
                    stack.redis.kill()
                    log.say(t0, f"Redis killed ({len(job_ids)} jobs submitted so far)")
                    heapq.heappush(timeline, (now + REDIS_DOWN_S, "redis-up", 0.0))
                elif fault == "redis-up":
                    stack.redis.start()
                    stack.redis.restarts += 1
                    log.say(t0, "Redis started again, empty: every message it held is gone")
                elif fault == "mlflow":
                    outage = MlflowOutage(stack, log, t0)
                    outage.start()
            time.sleep(0.05)
        if outage is not None:
            outage.join(timeout=180)
            assert not outage.is_alive(), "the MLflow server did not come back"
            if outage.error is not None:
                raise outage.error
        log.say(t0, f"all {len(job_ids)} jobs submitted, all faults done")
    finally:
        engine.dispose()
    return job_ids


def wait_for_all(stack: ChaosStack, job_ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Every job as the API shows it, once all have ended or the time is up. Waiting asks
    PostgreSQL (one query a second, not 24 requests: the machine is busy enough)."""
    engine = create_engine(stack.settings.database_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                ended = conn.execute(
                    text("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status = ANY(:ended)"),
                    {"ids": job_ids, "ended": sorted(TERMINAL)},
                ).scalar_one()
            if ended == len(job_ids):
                break
            time.sleep(1.0)
    finally:
        engine.dispose()
    return {job_id: stack.get(job_id) for job_id in job_ids}


@dataclass(frozen=True)
class Event:
    from_status: str | None
    to_status: str
    detail: str | None
    at: datetime


def histories(stack: ChaosStack, job_ids: list[str]) -> dict[str, list[Event]]:
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT job_id, from_status, to_status, detail, at FROM job_events "
                     "WHERE job_id = ANY(CAST(:ids AS uuid[])) ORDER BY id"),
                {"ids": job_ids},
            ).all()  # fmt: skip
    finally:
        engine.dispose()
    out: dict[str, list[Event]] = {job_id: [] for job_id in job_ids}
    for job_id, from_status, to_status, detail, at in rows:
        out[str(job_id)].append(Event(from_status, to_status, detail, at))
    return out


def expected_history(attempts: int) -> list[tuple[str | None, str]]:
    """Queued, then each lost attempt requeued by the reaper, then the last one succeeding."""
    lost = [("queued", "running"), ("running", "queued")] * (attempts - 1)
    return [(None, "queued"), *lost, ("queued", "running"), ("running", "succeeded")]


# The reaper's note on a requeue: "worker lost: worker <host>:<pid> stopped renewing its lease (attempt ...)"
REQUEUED_WORKER = re.compile(r"worker (\S+):(\d+) stopped renewing its lease")


def worker_logs(stack: ChaosStack) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(stack.log_dir.glob("worker-*.log")))


def ran_twice(stack: ChaosStack, job: dict, history: list[Event], logs: str) -> list[str]:
    """Why this succeeded job looks run more than once (or its record is not of one
    clean run); empty when it ran exactly once."""
    reasons = []
    job_id, attempts = job["id"], job["attempts"]
    transitions = [(e.from_status, e.to_status) for e in history]
    if transitions != expected_history(attempts):
        reasons.append(f"history {transitions} is not that of {attempts} attempt(s) one after another")
    # Two attempts alive at once: the reaper gave the job to another attempt while the
    # process it gave up on was still alive.
    for event in history:
        if event.to_status == "queued" and event.from_status is not None:
            found = REQUEUED_WORKER.search(event.detail or "")
            if found is None:
                reasons.append(f"requeued, but the reaper did not say which worker it gave up on: {event.detail}")
                continue
            pid = int(found.group(2))
            alive_after = stack.watch.last_alive.get(pid, 0.0) - event.at.timestamp()
            if alive_after > 0:
                reasons.append(f"process {pid} was still alive {alive_after:.1f} s after the reaper requeued "
                               f"its job ({event.detail}): two attempts at once")  # fmt: skip
    for line in logs.splitlines():
        if f"job {job_id} (attempt" in line and "was no longer this worker's" in line:
            reasons.append(f"a stale attempt was still running at its end: {line.strip()[-160:]}")
    # Every step exactly once in MLflow: nothing trained twice reported twice, nothing missing.
    response = stack.api.get(f"/v1/jobs/{job_id}/metrics")
    if response.status_code != 200:
        reasons.append(f"metrics unreadable: {response.status_code} {response.text[:200]}")
    else:
        metrics = response.json()
        total = job["progress"]["total_steps"]
        for key in ("train_loss", "lr", "grad_norm"):
            steps = [p["step"] for p in metrics.get(key, [])]
            if steps != list(range(total)):
                dup = sorted(s for s, n in Counter(steps).items() if n > 1)
                missing = sorted(set(range(total)) - set(steps))
                reasons.append(f"{key}: {len(steps)} points for {total} steps, "
                               f"duplicated {dup[:10]}, missing {missing[:10]}")  # fmt: skip
        val_steps = [p["step"] for p in metrics.get("val_accuracy", [])]
        if len(val_steps) != job["spec"]["epochs"] or len(set(val_steps)) != len(val_steps):
            reasons.append(f"val_accuracy at steps {val_steps} for {job['spec']['epochs']} epochs")
    # One MLflow run for the job, ended FINISHED by its last attempt.
    run_id = job["mlflow"]["run_id"]
    if run_id is None:
        reasons.append("no MLflow run")
    else:
        run = stack.mlflow.get_run(run_id)
        if run.info.status != "FINISHED":
            reasons.append(f"MLflow run {run_id} is {run.info.status}")
        if run.data.tags.get("descent.attempt") != str(attempts):
            reasons.append(f"MLflow run says attempt {run.data.tags.get('descent.attempt')}, the job {attempts}")
        runs = stack.mlflow.search_runs(
            [job["mlflow"]["experiment_id"]], filter_string=f"tags.`descent.job_id` = '{job_id}'"
        )
        if len(runs) != 1:
            reasons.append(f"{len(runs)} MLflow runs: " + ", ".join(f"{r.info.run_id} {r.info.status}" for r in runs))
    return reasons


def celery_pool_kills(logs: str) -> list[str]:
    """Pool processes Celery itself SIGKILLed (a fresh child whose "up" message it did
    not read within worker_proc_alive_timeout, e.g. while it reconnected to Redis)."""
    return [line.strip()[:160] for line in logs.splitlines() if "Timed out waiting for UP message" in line]


def false_lease_alarms(job_ids: list[str], logs: str) -> list[str]:
    """Jobs whose worker logged "lost its lease" (harmless when no requeue blames a live
    worker: see ran_twice); reported, so that the log noise is visible."""
    return [job_id for job_id in job_ids if f"job {job_id}: this worker lost its lease" in logs]


@pytest.mark.timeout(600)
def test_every_job_succeeds_exactly_once_through_worker_kills_and_outages(chaos_stack: ChaosStack) -> None:
    stack = chaos_stack
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    log = ChaosLog(seed)
    print(f"\nchaos seed {seed} (replay the plan with CHAOS_SEED={seed})", flush=True)
    rng = random.Random(seed)
    started = time.monotonic()

    job_ids = run_chaos(stack, rng, log)
    jobs = wait_for_all(stack, job_ids, timeout_s=DEADLINE_S)
    print(f"[chaos] jobs ended {time.monotonic() - started:.1f} s after the first submission", flush=True)

    events = histories(stack, job_ids)
    logs = worker_logs(stack)
    succeeded, failed, lost, twice = [], [], [], {}
    for job_id, job in jobs.items():
        if job["status"] not in TERMINAL:
            lost.append(job_id)
        elif job["status"] != "succeeded":
            failed.append(job_id)
        else:
            succeeded.append(job_id)
            if reasons := ran_twice(stack, job, events[job_id], logs):
                twice[job_id] = reasons

    summary = (f"submitted {len(job_ids)} / succeeded {len(succeeded)} / failed {len(failed)} / "
               f"lost {len(lost)} / run twice {len(twice)}")  # fmt: skip
    attempts = Counter(j["attempts"] for j in jobs.values())
    details = [
        f"seed {seed}",
        *log.lines,
        f"attempts per job: {dict(sorted(attempts.items()))}",
        *(f"note: Celery killed a pool process of its own: {line}" for line in celery_pool_kills(logs)),
        *(f"note {i}: a worker logged 'lost its lease' for it, yet no live worker's attempt was requeued"
          for i in false_lease_alarms(job_ids, logs) if i not in twice),  # fmt: skip
        *(f"lost {i}: {jobs[i]['status']} after {jobs[i]['attempts']} attempt(s), history {events[i]}" for i in lost),
        *(f"failed {i}: {jobs[i]['status']} {jobs[i]['error']}, history {events[i]}" for i in failed),
        *(f"run twice {i}: {'; '.join(r)}" for i, r in twice.items()),
        f"logs: {stack.log_dir}",
    ]
    print(summary)
    print("\n".join(details[len(log.lines) + 1 :]), flush=True)

    # The faults really happened, and really hit jobs.
    assert stack.redis.restarts == 1 and stack.mlflow_restarts == 1, details
    assert len(stack.worker_kills) == WORKER_KILLS, details
    assert log.kills_hitting_a_job, f"no kill hit a running job\n{summary}\n" + "\n".join(details)
    stack.group.check_alive()

    message = f"{summary}\n" + "\n".join(details)
    assert len(job_ids) == N_JOBS, message
    assert not lost, message
    assert not twice, message
    assert len(succeeded) == N_JOBS, message
    assert max(attempts) > 1, f"no job needed a second attempt\n{message}"
