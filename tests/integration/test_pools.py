"""Device pools on the real stack: workers in two pools, each pool's jobs run only on its
own workers, GET /v1/pools shows both, and a job for a pool whose workers are gone stays
queued saying why, then runs once a worker of its pool starts."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from launcher.processes import ChildProcess, ProcessGroup, wait_worker_ready, worker_command
from tests.integration.conftest import ADMIN_KEY, TERMINAL, running_stack, stack_settings

pytestmark = pytest.mark.integration

POOLS = ["alpha", "beta"]
HEARTBEAT_S = 1.0  # a worker is live while seen within three heartbeats: gone in 3 s
JOB = {"dataset": {"name": "iris"}, "epochs": 2, "batch_size": 16, "model": {"arch": "mlp", "hidden": [16]}}


class PoolStack:
    def __init__(self, group: ProcessGroup, api: httpx.Client, settings) -> None:  # noqa: ANN001
        self.group, self.api, self.settings = group, api, settings
        self.pool_of_group = {w.process.pid: pool for w, pool in zip(self.workers(), POOLS)}

    def workers(self) -> list[ChildProcess]:
        return [c for c in self.group.children if c.name.startswith("worker-")]

    def submit(self, pool: str, **spec: object) -> str:
        response = self.api.post("/v1/jobs", json=JOB | {"resources": {"pool": pool}} | spec)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def wait(self, job_id: str, until: set[str] = TERMINAL, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}: {job}"
            time.sleep(0.2)

    def worker_group(self, job_id: str) -> int:
        """The process group of the worker process that ran the job (`<host>:<pid>` on its row):
        the Celery parent's pid, which the launcher started in one pool."""
        engine = create_engine(self.settings.database_url)
        try:
            with engine.connect() as conn:
                worker = conn.execute(text("SELECT worker FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
        finally:
            engine.dispose()
        return os.getpgid(int(worker.rsplit(":", 1)[1]))

    def pools(self) -> dict[str, dict]:
        response = self.api.get("/v1/pools")
        assert response.status_code == 200, response.text
        return {p["name"]: p for p in response.json()["items"]}


@pytest.fixture(scope="module")
def pool_stack(make_database, tmp_path_factory) -> Iterator[PoolStack]:  # noqa: ANN001
    home = tmp_path_factory.mktemp("descent-pools")
    settings = stack_settings(make_database, home, "descent_pools", lease_s=3.0, reaper_interval_s=1.0,
                              unclaimed_requeue_s=5.0, bootstrap_key=ADMIN_KEY, log_model=False,
                              worker_heartbeat_interval_s=HEARTBEAT_S)  # fmt: skip
    with running_stack(settings, home, worker_pools=POOLS) as (group, api):
        yield PoolStack(group, api, settings)


def test_each_pools_jobs_run_on_its_own_workers_only(pool_stack: PoolStack) -> None:
    shown = pool_stack.pools()
    for pool in POOLS:
        (worker,) = shown[pool]["live_workers"]
        assert worker["name"].startswith("worker-") and worker["devices"][0]["kind"] == "cpu"
        assert worker["devices"][0]["memory_mb"] > 0
    ids = {pool: [pool_stack.submit(pool, seed=i) for i in range(3)] for pool in POOLS}
    for pool, job_ids in ids.items():
        for job_id in job_ids:
            job = pool_stack.wait(job_id)
            assert job["status"] == "succeeded", job
            assert job["spec"]["resources"]["pool"] == pool
            ran_on = pool_stack.pool_of_group[pool_stack.worker_group(job_id)]
            assert ran_on == pool, f"job {job_id} of pool {pool} ran on a worker of pool {ran_on}"


def test_a_pool_never_served_is_refused(pool_stack: PoolStack) -> None:
    response = pool_stack.api.post("/v1/jobs", json=JOB | {"resources": {"pool": "gamma"}})
    assert response.status_code == 422
    message = response.json()["detail"][0]["msg"]
    assert "'gamma'" in message and "alpha, beta, default" in message


def heartbeat_processes(worker: ChildProcess) -> list[psutil.Process]:
    return [p for p in psutil.Process(worker.process.pid).children()
            if "worker.heartbeat" in " ".join(p.cmdline())]  # fmt: skip


def test_a_heartbeat_process_that_dies_is_replaced_and_the_worker_stays_live(pool_stack: PoolStack) -> None:
    alpha = next(w for w in pool_stack.workers() if pool_stack.pool_of_group[w.process.pid] == "alpha")
    (first,) = heartbeat_processes(alpha)
    started_at = pool_stack.pools()["alpha"]["live_workers"][0]["started_at"]
    first.kill()
    first.wait(timeout=10)
    deadline = time.monotonic() + 20 * HEARTBEAT_S
    while not heartbeat_processes(alpha):
        assert time.monotonic() < deadline, "no heartbeat process started again"
        time.sleep(0.1)
    time.sleep(4 * HEARTBEAT_S)  # longer than three heartbeats: without beats it would be gone by now
    (worker,) = pool_stack.pools()["alpha"]["live_workers"]
    assert worker["started_at"] == started_at  # the worker did not start again; its heartbeat did
    assert pool_stack.wait(pool_stack.submit("alpha"))["status"] == "succeeded"


def test_a_job_waits_while_its_pool_has_no_worker_then_runs_on_a_new_one(pool_stack: PoolStack) -> None:
    beta = next(w for w in pool_stack.workers() if pool_stack.pool_of_group[w.process.pid] == "beta")
    pool_stack.group.stop(beta)  # a clean stop: the worker says it is gone
    assert pool_stack.pools()["beta"]["live_workers"] == []
    job_id = pool_stack.submit("beta")  # a known pool: accepted, and waits
    alpha_job = pool_stack.submit("alpha")
    assert pool_stack.wait(alpha_job)["status"] == "succeeded"  # the other pool goes on
    time.sleep(pool_stack.settings.unclaimed_requeue_s + 2)  # the reaper's resend does not hand it elsewhere
    job = pool_stack.api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued", job
    assert job["waiting_reason"].startswith("no live worker serves pool 'beta' (last seen "), job
    shown = pool_stack.pools()["beta"]
    assert shown["live_workers"] == [] and shown["queued"] == 1 and shown["last_seen"] is not None

    worker = pool_stack.group.start("worker-2", worker_command(pool_stack.settings, name="worker-2", pool="beta"))
    pool_stack.pool_of_group[worker.process.pid] = "beta"
    wait_worker_ready(worker)
    job = pool_stack.wait(job_id)
    assert job["status"] == "succeeded" and job["waiting_reason"] is None
    assert pool_stack.worker_group(job_id) == worker.process.pid
    assert [w["name"] for w in pool_stack.pools()["beta"]["live_workers"]] == [f"worker-2@{os.uname().nodename}"]
