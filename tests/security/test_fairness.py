"""Issue 14, item 5 (fairness): every job was a message on one FIFO queue, so a
project with hundreds of queued jobs made everyone else wait for all of them. Now a
delivered message is a slot: the worker runs the oldest queued job of the project
with the fewest jobs running (jobs/repository.py, claim_next_job)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from tests.integration.conftest import Stack
from tests.security.conftest import Tenant

JOB = {"dataset": {"name": "iris"}, "epochs": 5, "batch_size": 32}  # well under a second of training


def started_at(tenant: Tenant, job_id: str) -> datetime | None:
    job = tenant.api.get(f"/v1/jobs/{job_id}").json()
    return datetime.fromisoformat(job["started_at"]) if job["started_at"] else None


def test_one_job_is_not_starved_by_another_projects_backlog(stack: Stack, make_tenant: Callable[..., Tenant]) -> None:
    busy, single = make_tenant("fair-busy"), make_tenant("fair-single")
    slots = 2  # the stack's one worker runs two jobs at a time
    backlog = []
    for i in range(12):
        response = busy.api.post("/v1/jobs", json=JOB | {"name": f"backlog-{i}"})
        assert response.status_code == 201, response.text
        backlog.append(response.json()["id"])
    try:
        deadline = time.monotonic() + 600  # a loaded machine takes ~30 s a job
        while sum(started_at(busy, j) is not None for j in backlog) < slots:  # the backlog holds both slots
            assert time.monotonic() < deadline
            time.sleep(0.2)
        response = single.api.post("/v1/jobs", json=JOB | {"name": "single"})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        while (single_start := started_at(single, job_id)) is None:
            assert time.monotonic() < deadline, "the single job never started"
            time.sleep(0.2)
        before = [j for j in backlog if (s := started_at(busy, j)) is not None and s < single_start]
        print(f"fairness: {len(before)} of {len(backlog)} backlog jobs started before the single one")
        # FIFO ran the whole backlog first (12). Fair: the jobs holding the slots, and at
        # most one more per slot that freed while the busy project had none running.
        assert len(before) <= 2 * slots, f"{len(before)} of the backlog's jobs started before the single one"
    finally:
        for j in backlog:
            busy.api.post(f"/v1/jobs/{j}/cancel")
