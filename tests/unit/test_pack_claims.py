"""Claiming a pack (issue 13): a worker that claimed a study's first-attempt trial takes the
queued trials of the same study that pack with it (same pack key, up to pack_size - 1), each
claimed as its own job with its own attempt and lease, all marked with one pack id; trials
that differ in more than packable fields, resumed trials and studies with pack_size 1 stay
alone. The job and study responses say which trials trained packed."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from jobs import repository
from jobs.db import session_scope
from jobs.models import Job
from jobs.packing import raw_pack_key
from jobs.states import JobStatus
from worker.execute_pack import claim_mates, pack_of

BASE = {"dataset": {"name": "iris"}, "epochs": 1, "batch_size": 16}
# 2 optimizer families x 2 learning rates x 2 seeds: two packs of four trials (sgd's, adam's)
STUDY = {"name": "unit-packs", "base": BASE, "repeats": 2,
         "space": {"optimizer.name": {"grid": ["sgd", "adam"]}, "optimizer.lr": {"grid": [0.1, 0.01]}},
         "search": {"method": "grid", "parallelism": 8}}  # fmt: skip


def submit(client: TestClient, body: dict) -> list[dict]:
    response = client.post("/v1/studies", json=body)
    assert response.status_code == 201, response.text
    study_id = response.json()["id"]
    return client.get("/v1/jobs", params={"study_id": study_id, "limit": 100}).json()["items"]


def claim_with_mates(job_id: str) -> tuple[int, list[repository.Claim]]:
    with session_scope() as session:
        attempt = repository.claim_job(session=session, job_id=uuid.UUID(job_id), worker="w", lease_s=60)
        assert attempt is not None
        job = session.get(Job, uuid.UUID(job_id))
        return attempt, claim_mates(session=session, job=job, attempt=attempt, worker="w")


def test_a_trial_claims_the_queued_trials_it_packs_with_each_as_its_own_job(client: TestClient) -> None:
    jobs = submit(client, STUDY)
    assert len(jobs) == 8  # parallelism 8: every trial queued at once
    sgd = sorted((j for j in jobs if j["spec"]["optimizer"]["name"] == "sgd"), key=lambda j: j["created_at"])
    attempt, mates = claim_with_mates(sgd[0]["id"])
    assert attempt == 1
    assert {str(c.job_id) for c in mates} == {j["id"] for j in sgd[1:]}  # the other sgd trials, not adam's
    assert all(c.attempt == 1 for c in mates)
    after = {j["id"]: j for j in client.get("/v1/jobs", params={"study_id": jobs[0]["study"]["study_id"],
                                                                 "limit": 100}).json()["items"]}  # fmt: skip
    packed = [after[j["id"]] for j in sgd]
    assert all(j["status"] == "running" and j["attempts"] == 1 for j in packed)
    assert len({j["study"]["pack_id"] for j in packed}) == 1 and packed[0]["study"]["pack_id"] is not None
    assert all(after[j["id"]]["status"] == "queued" and after[j["id"]]["study"]["pack_id"] is None
               for j in jobs if j["spec"]["optimizer"]["name"] == "adam")  # fmt: skip
    with session_scope() as session:
        rows = pack_of(session, [repository.Claim(uuid.UUID(sgd[0]["id"]), 1), *mates])
    assert [str(job.id) for job, _ in rows][0] == sgd[0]["id"] and all(job.pack_id is not None for job, _ in rows)

    study = client.get(f"/v1/studies/{jobs[0]['study']['study_id']}").json()
    [pack] = study["packs"]
    assert pack["pack_id"] == packed[0]["study"]["pack_id"] and sorted(pack["job_ids"]) == sorted(j["id"] for j in sgd)


def test_a_pack_holds_at_most_pack_size_trials(client: TestClient) -> None:
    jobs = submit(client, STUDY | {"name": "unit-packs-2", "search": {"method": "grid", "parallelism": 8, "pack_size": 3}})
    sgd = [j for j in jobs if j["spec"]["optimizer"]["name"] == "sgd"]
    _, mates = claim_with_mates(sgd[0]["id"])
    assert len(mates) == 2


def test_pack_size_1_and_a_resumed_trial_run_alone(client: TestClient) -> None:
    jobs = submit(client, STUDY | {"name": "unit-packs-off", "search": {"method": "grid", "parallelism": 8, "pack_size": 1}})
    _, mates = claim_with_mates(jobs[0]["id"])
    assert mates == []

    jobs = submit(client, STUDY | {"name": "unit-packs-resumed"})
    first = jobs[0]["id"]
    with session_scope() as session:  # its first attempt's worker died: the reaper requeued it
        assert repository.claim_job(session=session, job_id=uuid.UUID(first)) == 1
        repository.transition(session=session, job_id=uuid.UUID(first), expected=[JobStatus.running],
                              to=JobStatus.queued)  # fmt: skip
    attempt, mates = claim_with_mates(first)
    assert attempt == 2 and mates == []
    with session_scope() as session:
        assert session.get(Job, uuid.UUID(first)).pack_id is None


def test_only_trials_that_pass_the_callers_rule_are_claimed(client: TestClient) -> None:
    jobs = submit(client, STUDY | {"name": "unit-packs-rule"})
    lead = jobs[0]
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=uuid.UUID(lead["id"])) == 1
        job = session.get(Job, uuid.UUID(lead["id"]))
        _, claims = repository.claim_pack_mates(session=session, job=job, fits=lambda spec: spec["seed"] == 1,
                                                max_size=16)  # fmt: skip
    claimed = {str(c.job_id) for c in claims}
    assert claimed == {j["id"] for j in jobs if j["spec"]["seed"] == 1 and j["id"] != lead["id"]}
    with session_scope() as session:
        job = session.get(Job, uuid.UUID(jobs[-1]["id"]))
        _, none = repository.claim_pack_mates(session=session, job=job, fits=lambda spec: False, max_size=16)
        assert none == [] and session.get(Job, job.id).pack_id is None


def test_the_pack_key_of_a_stored_spec_ignores_what_packs_and_refuses_what_does_not() -> None:
    sgd = {"dataset": {"name": "iris"}, "optimizer": {"name": "sgd", "lr": 0.1}, "seed": 0}
    assert raw_pack_key(sgd) == raw_pack_key(sgd | {"optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
                                                    "seed": 3, "schedule": {"name": "cosine"}})  # fmt: skip
    assert raw_pack_key(sgd) != raw_pack_key(sgd | {"optimizer": {"name": "adam"}})
    assert raw_pack_key(sgd) != raw_pack_key(sgd | {"batch_size": 32})
    assert raw_pack_key(sgd | {"diagnostics": {"per_class": True}}) is None
