"""The fleet test (issue 17's proof): 4 workers in 2 device pools on this machine, 200 short
jobs and 2 small studies spread over the pools, one busy worker of each pool SIGKILLed midway
(and replaced by a worker of the same pool). Every job must end succeeded, in its own pool
(each of its attempts ran on a worker of its pool), none lost, none run twice (test_chaos's
checks: a clean history, no attempt requeued while its process lived, every step in MLflow
exactly once, one FINISHED run). Every checkpoint goes to the object store (MLflow's artifact
store, CHECKPOINT_INLINE_MAX_BYTES=0): each checkpoint row is a pointer, and every attempt
that resumed from a checkpoint read it back from the store, its SHA-256 checked.

FLEET_JOBS=<n> runs fewer jobs (default 200, as the issue says).
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.faults.conftest import TERMINAL, ChaosStack, open_chaos_stack
from tests.faults.test_chaos import (
    REQUEUED_WORKER,
    histories,
    ran_twice,
    running_jobs_by_worker,
    wait_for_all,
    worker_logs,
)

pytestmark = pytest.mark.integration

POOLS = ["alpha", "beta"]
WORKER_POOLS = ["alpha", "alpha", "beta", "beta"]
N_JOBS = int(os.environ.get("FLEET_JOBS") or 200)
KILL_WHEN_ENDED = 0.35  # the kills come once this share of the jobs has ended
DEADLINE_S = 420.0

# A few seconds each, checkpointed every 4 steps, so that a killed attempt resumes mid-epoch.
JOB = {
    "experiment": "fleet",
    "dataset": {"name": "iris", "val_fraction": 0.2},  # 120 training samples: 8 steps an epoch
    "model": {"arch": "mlp", "hidden": [16]},
    "optimizer": {"name": "adam", "lr": 0.01},
    "batch_size": 16,
    "log_every_steps": 1,
    "checkpoint_every_steps": 4,
    "max_attempts": 20,
}


def job_spec(i: int) -> dict:
    return JOB | {"name": f"fleet-{i:03d}", "epochs": 2 + i % 3, "seed": i, "resources": {"pool": POOLS[i % 2]}}


def study_spec(pool: str) -> dict:
    return {"name": f"fleet-study-{pool}", "base": JOB | {"epochs": 3}, "resources": {"pool": pool},
            "space": {"optimizer.lr": {"grid": [0.003, 0.01, 0.03]}}, "search": {"method": "grid", "parallelism": 2}}  # fmt: skip


@pytest.fixture(scope="module")
def fleet_stack(make_database, tmp_path_factory) -> ChaosStack:  # noqa: ANN001
    with open_chaos_stack(make_database, tmp_path_factory.mktemp("descent-fleet"), WORKER_POOLS,
                          log_model=False, system_metrics_interval_s=0.0, worker_heartbeat_interval_s=1.0,
                          checkpoint_inline_max_bytes=0) as stack:  # fmt: skip
        yield stack


def ended_count(engine, job_ids: list[str]) -> int:  # noqa: ANN001
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status = ANY(:ended)"),
            {"ids": job_ids, "ended": sorted(TERMINAL)},
        ).scalar_one()


PREFER_CHECKPOINTED_S = 3.0  # how long a kill waits for a worker whose job has stored a checkpoint (longer, and the jobs may all have ended: CI saw kills hit nothing)


def checkpointed_running_jobs(engine) -> set[str]:  # noqa: ANN001
    """The running jobs whose current attempt has stored a checkpoint (in the object store)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT j.id FROM jobs j JOIN job_checkpoints c ON c.job_id = j.id "
                                 "WHERE j.status = 'running' AND c.attempt = j.attempts")).all()  # fmt: skip
    return {str(job_id) for (job_id,) in rows}


def kill_one_busy_worker_per_pool(stack: ChaosStack, engine, say) -> tuple[list[str], set[str]]:  # noqa: ANN001
    """SIGKILL a worker of each pool in the middle of a job, start one of the same pool in
    its place; the ids of the jobs the kills hit, and of those that had stored a checkpoint.
    A worker whose job has stored a checkpoint is preferred (for up to PREFER_CHECKPOINTED_S),
    so that a resume reads one back from the object store; else any busy one. (A short job
    stores its checkpoints mostly once its training is over, while its results are logged:
    it may also end just before the kill lands, and then nothing resumes.)"""
    hit: list[str] = []
    hit_checkpointed: set[str] = set()
    for pool in POOLS:
        started = time.monotonic()
        while True:
            busy = running_jobs_by_worker(engine)
            checkpointed = checkpointed_running_jobs(engine)
            candidates = [w for w in stack.workers() if stack.pool_of_group.get(w.process.pid) == pool]
            victim = next((w for w in candidates if checkpointed & set(busy.get(w.process.pid, []))), None)
            if victim is None and time.monotonic() - started > PREFER_CHECKPOINTED_S:
                victim = next((w for w in candidates if w.process.pid in busy), None)
            if victim is not None or time.monotonic() - started > 30:
                victim = victim or candidates[0]
                break
            time.sleep(0.05)
        jobs = busy.get(victim.process.pid, [])
        pids = stack.kill_worker(victim)
        hit += jobs
        replacement = stack.start_worker(wait=False, pool=pool)
        with_checkpoint = sorted(checkpointed & set(jobs))
        hit_checkpointed |= set(with_checkpoint)
        say(f"SIGKILL {victim.name} (pool {pool}, {len(pids)} processes, running {jobs or 'nothing'}, "
            f"with a stored checkpoint {with_checkpoint or 'none'}); started {replacement.name} in pool {pool}")  # fmt: skip
    return hit, hit_checkpointed


def workers_of(stack: ChaosStack, job_ids: list[str]) -> dict[str, str | None]:
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, worker FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                                {"ids": job_ids}).all()  # fmt: skip
    finally:
        engine.dispose()
    return {str(job_id): worker for job_id, worker in rows}


def checkpoint_rows(stack: ChaosStack, job_ids: list[str]) -> dict[str, tuple[bool, str | None]]:
    """{job id: (whether its row holds bytes, its object's URI)} of the jobs with a checkpoint."""
    engine = create_engine(stack.settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT job_id, data IS NOT NULL, object_uri FROM job_checkpoints "
                                     "WHERE job_id = ANY(CAST(:ids AS uuid[]))"), {"ids": job_ids}).all()  # fmt: skip
    finally:
        engine.dispose()
    return {str(job_id): (inline, uri) for job_id, inline, uri in rows}


RESUMED = re.compile(
    r"job (\S+) attempt \d+ resumes from step \d+ \(checkpoint read from (\S+), \d+ bytes, SHA-256 checked\)"
)


def resumes_from_the_store(logs: str, job_ids: set[str]) -> tuple[set[str], list[str]]:
    """(the jobs an attempt of which resumed from a checkpoint read from the job's objects in the
    store, the resume lines that read one from anywhere else)."""
    resumes = [(m.group(1), m.group(2), m.group(0)) for m in RESUMED.finditer(logs) if m.group(1) in job_ids]
    from_store = {job_id for job_id, source, _ in resumes
                  if source.startswith(f"mlflow-artifacts:/descent/checkpoints/{job_id}/")}  # fmt: skip
    return from_store, [line for job_id, _, line in resumes if job_id not in from_store]


def pool_of_worker(stack: ChaosStack, worker: str | None) -> str | None:
    """The pool of the worker whose process `<host>:<pid>` was: its process group (seen by
    the process watch) is the Celery parent the test started in one pool."""
    if worker is None:
        return None
    pid = int(worker.rsplit(":", 1)[1])
    return stack.pool_of_group.get(stack.watch.groups.get(pid, -1))


@pytest.mark.timeout(900)
def test_a_fleet_of_two_pools_loses_nothing_runs_nothing_twice_and_keeps_each_job_in_its_pool(
    fleet_stack: ChaosStack,
) -> None:
    stack = fleet_stack
    t0 = time.monotonic()
    lines: list[str] = []

    def say(message: str) -> None:
        line = f"[fleet {time.monotonic() - t0:6.1f} s] {message}"
        lines.append(line)
        print(line, flush=True)

    assert stack.api.put("/v1/projects/default/limits", json={"max_active_jobs": 10_000}).status_code == 200
    shown = {p["name"]: p for p in stack.api.get("/v1/pools").json()["items"]}
    assert [len(shown[pool]["live_workers"]) for pool in POOLS] == [2, 2], shown

    study_ids = []
    for pool in POOLS:
        response = stack.api.post("/v1/studies", json=study_spec(pool))
        assert response.status_code == 201, response.text
        study_ids.append(response.json()["id"])
    job_ids = [stack.submit(job_spec(i))["id"] for i in range(N_JOBS)]
    say(f"{N_JOBS} jobs and {len(study_ids)} studies submitted")

    engine = create_engine(stack.settings.database_url)
    try:
        while ended_count(engine, job_ids) < KILL_WHEN_ENDED * N_JOBS:
            assert time.monotonic() - t0 < DEADLINE_S, "the jobs do not move"
            time.sleep(0.5)
        hit, hit_checkpointed = kill_one_busy_worker_per_pool(stack, engine, say)
    finally:
        engine.dispose()

    deadline = time.monotonic() + DEADLINE_S
    studies: dict[str, dict] = {}
    while time.monotonic() < deadline:
        studies = {s: stack.api.get(f"/v1/studies/{s}").json() for s in study_ids}
        if all(s["status"] in {"succeeded", "failed", "cancelled"} for s in studies.values()):
            break
        time.sleep(1.0)
    trial_ids = [j["id"] for s in study_ids
                 for j in stack.api.get("/v1/jobs", params={"study_id": s, "limit": 100}).json()["items"]]  # fmt: skip
    all_ids = job_ids + trial_ids
    jobs = wait_for_all(stack, all_ids, timeout_s=max(10.0, deadline - time.monotonic()))
    say(f"{len(all_ids)} jobs ({len(trial_ids)} study trials) ended or out of time")

    events = histories(stack, all_ids)
    logs = worker_logs(stack)
    ran_on = workers_of(stack, all_ids)
    # test_chaos's checks of each job, a few at once (each reads the job's metrics and MLflow run).
    succeeded = [job for job in jobs.values() if job["status"] == "succeeded"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        twice_reasons = dict(zip([job["id"] for job in succeeded],
                                 pool.map(lambda job: ran_twice(stack, job, events[job["id"]], logs), succeeded)))  # fmt: skip
    lost, failed, twice, elsewhere = [], [], {}, {}
    for job_id, job in jobs.items():
        pool = job["spec"]["resources"]["pool"]
        if job["status"] not in TERMINAL:
            lost.append(job_id)
            continue
        if job["status"] != "succeeded":
            failed.append(job_id)
            continue
        if reasons := twice_reasons[job_id]:
            twice[job_id] = reasons
        # Where each attempt ran: the last on the job's row, each lost one in the reaper's note.
        attempts = [ran_on[job_id]] + [f"{m.group(1)}:{m.group(2)}" for e in events[job_id]
                                        if (m := REQUEUED_WORKER.search(e.detail or ""))]  # fmt: skip
        pools_seen = {pool_of_worker(stack, worker) for worker in attempts}
        if pools_seen != {pool}:
            elsewhere[job_id] = f"pool {pool}, attempts on workers {attempts} of pools {pools_seen}"

    # The object store: no checkpoint bytes in PostgreSQL, every resume read from the store.
    checkpoints = checkpoint_rows(stack, all_ids)
    inline_rows = [job_id for job_id, (inline, uri) in checkpoints.items() if inline or uri is None]
    from_store, not_from_store = resumes_from_the_store(logs, set(all_ids))
    # A job killed with a checkpoint stored and requeued must have resumed from it, from the store.
    not_resumed = sorted(j for j in hit_checkpointed if jobs[j]["attempts"] > 1 and j not in from_store)
    lines.append(f"checkpoint rows {len(checkpoints)} (holding bytes: {len(inline_rows)}); jobs resumed from a "
                 f"checkpoint read back from the object store {len(from_store)}, from elsewhere {len(not_from_store)}; "
                 f"killed with a stored checkpoint {len(hit_checkpointed)}, of which requeued "
                 f"{sum(jobs[j]['attempts'] > 1 for j in hit_checkpointed)}")  # fmt: skip

    attempts = Counter(j["attempts"] for j in jobs.values())
    summary = (f"jobs {len(all_ids)} / succeeded {len(all_ids) - len(lost) - len(failed)} / failed {len(failed)} / "
               f"lost {len(lost)} / run twice {len(twice)} / outside their pool {len(elsewhere)}; "
               f"attempts per job {dict(sorted(attempts.items()))}; {time.monotonic() - t0:.0f} s")  # fmt: skip
    details = "\n".join([
        summary, *lines,
        *(f"study {s}: {st['status']}" for s, st in studies.items()),
        *(f"lost {i}: {jobs[i]['status']}, history {events[i]}" for i in lost),
        *(f"failed {i}: {jobs[i]['error']}" for i in failed),
        *(f"run twice {i}: {'; '.join(r)}" for i, r in twice.items()),
        *(f"outside its pool {i}: {why}" for i, why in elsewhere.items()),
        *(f"checkpoint bytes in PostgreSQL: {i}" for i in inline_rows),
        *(f"resumed not from the object store: {line}" for line in not_from_store),
        *(f"killed with a stored checkpoint, requeued, not resumed from it: {i}" for i in not_resumed),
        f"logs: {stack.log_dir}",
    ])  # fmt: skip
    print(details, flush=True)

    assert len(stack.worker_kills) == 2 and hit, f"the kills hit no running job\n{details}"
    assert all(s["status"] == "succeeded" for s in studies.values()), details
    assert len(trial_ids) == 2 * 3, details
    assert not lost and not failed and not twice and not elsewhere, details
    assert max(attempts) > 1, f"no job needed a second attempt\n{details}"
    assert not inline_rows and not not_from_store and not not_resumed, details
    stack.group.check_alive()
    assert Path(stack.log_dir).is_dir()
