"""Device pools: the spec's `resources.pool`, the claim that takes only the worker's pool's
jobs, each pool's own queue (the API's and the reaper's sends), the workers' heartbeats,
GET /v1/pools, and the 422 for a pool no worker ever served."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from jobs import pools, repository
from jobs.db import session_scope
from jobs.models import Base, Job, Project, Worker, utcnow
from jobs.queue import pool_queue, queue_depth
from jobs.settings import Settings, settings
from jobs.spec import JobSpec
from jobs.study_spec import StudySpec, sampled_spec
from worker import heartbeat as heartbeat_process
from worker import reaper

IRIS = {"dataset": {"name": "iris"}, "epochs": 1}
CPU = [{"kind": "cpu", "name": "2 cores", "memory_mb": 1024}]


def new_pool() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


def heartbeat(pool: str, name: str | None = None, **kwargs: object) -> str:
    name = name or f"w-{uuid.uuid4().hex[:8]}@host"
    with session_scope() as session:
        pools.record_heartbeat(session=session, name=name, pool=pool, devices=CPU, concurrency=2, starting=True,
                               **kwargs)  # fmt: skip
    return name


# --------------------------------------------------------------------------- the spec


def test_a_job_runs_in_the_default_pool_unless_it_asks_for_one() -> None:
    assert JobSpec.model_validate(IRIS).resources.pool == "default"
    assert JobSpec.model_validate(IRIS | {"resources": {"pool": "gpu-a100"}}).resources.pool == "gpu-a100"
    assert JobSpec.model_validate(IRIS).flat_params()["resources.pool"] == "default"  # in MLflow's params too


@pytest.mark.parametrize("pool", ["GPU", "gpu_a100", "-gpu", "gpu-", "", "a" * 33, "gpu/x", "gpu.a"])
def test_a_pool_name_is_a_short_slug(pool: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(IRIS | {"resources": {"pool": pool}})
    assert [e["loc"] for e in caught.value.errors()] == [("resources", "pool")]
    with pytest.raises(ValidationError):
        Settings(worker_pool=pool)


def test_resources_accept_nothing_but_the_pool() -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(IRIS | {"resources": {"pool": "gpu", "gpus": 2}})
    assert caught.value.errors()[0]["loc"] == ("resources", "gpus")


def test_a_bad_pool_is_a_422_naming_resources_pool(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=IRIS | {"resources": {"pool": "GPU!"}})
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["detail"]] == ["resources.pool"]


def test_a_study_passes_its_resources_to_every_trial() -> None:
    base = {"name": "s", "base": IRIS, "space": {"optimizer.lr": {"grid": [0.01, 0.1]}}}
    on_top = StudySpec.model_validate(base | {"resources": {"pool": "cpu"}})
    assert on_top.pool == "cpu" and sampled_spec(on_top, {"optimizer.lr": 0.1}, 0).resources.pool == "cpu"
    in_base = StudySpec.model_validate(base | {"base": IRIS | {"resources": {"pool": "gpu"}}})
    assert in_base.pool == "gpu" and sampled_spec(in_base, {"optimizer.lr": 0.1}, 0).resources.pool == "gpu"
    assert StudySpec.model_validate(base).pool == "default"
    with pytest.raises(ValidationError, match="differ"):
        StudySpec.model_validate(base | {"base": IRIS | {"resources": {"pool": "gpu"}}, "resources": {"pool": "cpu"}})
    with pytest.raises(ValidationError, match="one device pool"):
        StudySpec.model_validate(base | {"space": {"resources.pool": {"grid": ["cpu", "gpu"]}}})


# --------------------------------------------------------------------------- the claim


def test_a_worker_claims_only_its_pools_jobs_fairest_first() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Project(name="busy"), Project(name="single")])
        gpu, cpu = (JobSpec.model_validate(IRIS | {"resources": {"pool": p}}) for p in ("gpu", "cpu"))
        busy_gpu = [repository.create_job(session=session, spec=gpu, project="busy")[0].id for _ in range(3)]
        cpu_job = repository.create_job(session=session, spec=cpu, project="single")[0].id
        single_gpu = repository.create_job(session=session, spec=gpu, project="single")[0].id
        assert session.get(Job, cpu_job).pool == "cpu"
        # The cpu job is older than single's gpu job, and single has nothing running: a gpu
        # worker still never takes it.
        claims = [repository.claim_next_job(session=session, pool="gpu") for _ in range(4)]
        assert [c.job_id for c in claims] == [busy_gpu[0], single_gpu, busy_gpu[1], busy_gpu[2]]
        assert repository.claim_next_job(session=session, pool="gpu") is None  # a message with nothing of its pool
        assert repository.claim_next_job(session=session, pool="tpu") is None
        assert repository.claim_next_job(session=session, pool="cpu").job_id == cpu_job


def test_fair_share_counts_the_jobs_running_in_the_pool() -> None:
    """A project busy in another pool is not behind in this one."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Project(name="a"), Project(name="b")])
        gpu, cpu = (JobSpec.model_validate(IRIS | {"resources": {"pool": p}}) for p in ("gpu", "cpu"))
        for _ in range(2):
            repository.create_job(session=session, spec=cpu, project="a")
        assert repository.claim_next_job(session=session, pool="cpu") is not None  # a runs a cpu job
        b_first = repository.create_job(session=session, spec=gpu, project="b")[0].id
        a_then = repository.create_job(session=session, spec=gpu, project="a")[0].id
        assert [repository.claim_next_job(session=session, pool="gpu").job_id for _ in range(2)] == [b_first, a_then]


# --------------------------------------------------------------------------- known pools, waiting jobs


def test_a_job_for_a_pool_no_worker_ever_served_is_a_422_naming_it_and_the_known_ones(client: TestClient) -> None:
    served, never = new_pool(), new_pool()
    heartbeat(served)
    response = client.post("/v1/jobs", json=IRIS | {"resources": {"pool": never}})
    assert response.status_code == 422, response.text
    (item,) = response.json()["detail"]
    assert item["field"] == "resources.pool" and item["type"] == "pool_unknown"
    assert never in item["msg"] and served in item["msg"] and "default" in item["msg"]
    assert client.post("/v1/jobs", json=IRIS | {"resources": {"pool": served}}).status_code == 201
    assert client.post("/v1/jobs", json=IRIS).status_code == 201  # the default pool is always known


def test_a_study_for_an_unknown_pool_is_a_422(client: TestClient) -> None:
    study = {"name": "pooled", "base": IRIS, "space": {"optimizer.lr": {"grid": [0.01, 0.1]}}}
    never = new_pool()
    response = client.post("/v1/studies", json=study | {"resources": {"pool": never}})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "resources.pool"
    response = client.post("/v1/studies", json=study | {"base": IRIS | {"resources": {"pool": never}}})
    assert response.status_code == 422 and response.json()["detail"][0]["field"] == "base.resources.pool"
    served = new_pool()
    heartbeat(served)
    created = client.post("/v1/studies", json=study | {"resources": {"pool": served}})
    assert created.status_code == 201, created.text
    trials = client.get("/v1/jobs", params={"study_id": created.json()["id"]}).json()["items"]
    assert trials and {t["spec"]["resources"]["pool"] for t in trials} == {served}
    assert queue_depth(served) == len(trials)  # each trial's message in its pool's queue
    client.post(f"/v1/studies/{created.json()['id']}/cancel")


def test_unknown_pools_are_accepted_when_allowed_and_the_job_says_why_it_waits(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "allow_unknown_pools", True)
    pool = new_pool()
    job = client.post("/v1/jobs", json=IRIS | {"resources": {"pool": pool}})
    assert job.status_code == 201
    assert queue_depth(pool) == 1 and queue_depth(new_pool()) == 0  # its message is in its pool's queue
    read = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert read["status"] == "queued"
    assert read["waiting_reason"] == f"no live worker serves pool '{pool}' (no worker has served it yet)"
    client.post(f"/v1/jobs/{job.json()['id']}/cancel")


def test_a_pool_whose_workers_are_gone_keeps_its_jobs_queued_and_says_so(client: TestClient) -> None:
    pool = new_pool()
    name = heartbeat(pool)
    job_id = client.post("/v1/jobs", json=IRIS | {"resources": {"pool": pool}}).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}").json()["waiting_reason"] is None  # a live worker will take it
    with session_scope() as session:  # three heartbeats missed: its worker is no longer live
        stale = utcnow() - timedelta(seconds=4 * settings.worker_heartbeat_interval_s)
        session.execute(update(Worker).where(Worker.name == name).values(last_seen=stale))
    read = client.get(f"/v1/jobs/{job_id}").json()
    assert read["status"] == "queued"
    assert read["waiting_reason"].startswith(f"no live worker serves pool '{pool}' (last seen 20")
    listed = client.get("/v1/jobs", params={"status": "queued", "limit": 100}).json()["items"]
    assert next(j for j in listed if j["id"] == job_id)["waiting_reason"] == read["waiting_reason"]
    heartbeat(pool, name)  # it is back
    assert client.get(f"/v1/jobs/{job_id}").json()["waiting_reason"] is None
    with session_scope() as session:
        pools.record_stopped(session=session, name=name)  # a clean stop: not live at once
    assert "last seen" in client.get(f"/v1/jobs/{job_id}").json()["waiting_reason"]
    client.post(f"/v1/jobs/{job_id}/cancel")


def test_get_pools_shows_live_workers_devices_and_job_counts(client: TestClient) -> None:
    pool = new_pool()
    live, gone = heartbeat(pool), heartbeat(pool)
    with session_scope() as session:
        pools.record_stopped(session=session, name=gone)
    ids = [client.post("/v1/jobs", json=IRIS | {"resources": {"pool": pool}}).json()["id"] for _ in range(3)]
    with session_scope() as session:
        assert repository.claim_next_job(session=session, pool=pool, worker="host:1") is not None
    listed = client.get("/v1/pools")
    assert listed.status_code == 200
    by_name = {p["name"]: p for p in listed.json()["items"]}
    assert "default" in by_name
    mine = by_name[pool]
    assert [w["name"] for w in mine["live_workers"]] == [live]
    assert mine["live_workers"][0]["concurrency"] == 2
    assert mine["devices"] == [{"kind": "cpu", "name": "2 cores", "memory_mb": 1024}]
    assert (mine["running"], mine["queued"], mine["project_running"], mine["project_queued"]) == (1, 2, 1, 2)
    assert mine["last_seen"] is not None
    for job_id in ids:
        client.post(f"/v1/jobs/{job_id}/cancel")
    assert client.get("/v1/pools", headers={"Authorization": ""}).status_code == 401


def test_another_projects_caller_sees_the_counts_but_not_as_its_own(client: TestClient) -> None:
    pool = new_pool()
    heartbeat(pool)
    job_id = client.post("/v1/jobs", json=IRIS | {"resources": {"pool": pool}}).json()["id"]
    project = f"p-{uuid.uuid4().hex[:10]}"
    assert client.post("/v1/projects", json={"name": project}).status_code == 201
    key = client.post(f"/v1/projects/{project}/keys", json={}).json()["key"]
    other = client.get("/v1/pools", headers={"Authorization": f"Bearer {key}"}).json()["items"]
    seen = next(p for p in other if p["name"] == pool)
    assert (seen["queued"], seen["project_queued"]) == (1, 0)
    client.post(f"/v1/jobs/{job_id}/cancel")


# --------------------------------------------------------------------------- the reaper


def test_the_reaper_sends_a_lost_message_to_the_jobs_own_pool_queue(migrated_db: str) -> None:
    pool = new_pool()
    with session_scope() as session:
        job, _ = repository.create_job(session=session, spec=JobSpec.model_validate(IRIS | {"resources": {"pool": pool}}))
        job_id = job.id
    with session_scope() as session:  # its message was never sent (the broker was down), long ago
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(hours=1)))
    assert queue_depth(pool) == 0
    assert reaper.resend_lost_messages() >= 1
    assert queue_depth(pool) == 1
    assert reaper.resend_lost_messages() == 0 or queue_depth(pool) == 1  # not again: the queue holds its slot
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=job_id)


def test_each_pool_has_its_own_queue() -> None:
    assert pool_queue("gpu") == f"{settings.queue_name}.gpu"


# --------------------------------------------------------------------------- the heartbeat's devices


def test_a_worker_without_gpus_reports_its_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    (device,) = heartbeat_process.detect_devices()
    assert device["kind"] == "cpu" and device["memory_mb"] > 0


def test_a_worker_reports_the_gpus_nvidia_smi_lists_within_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, tmp_path  # noqa: ANN001
) -> None:
    # nvidia-smi's answer to the query the heartbeat makes, as an H200 machine with two GPUs gives it.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaaa, NVIDIA H200, 143771'\necho '1, GPU-bbbb, NVIDIA H200, 143771'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert heartbeat_process.detect_devices() == [{"kind": "cuda", "name": "NVIDIA H200", "memory_mb": 143771}]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(heartbeat_process.detect_devices()) == 2


def test_the_reaper_deletes_workers_long_gone_but_each_pool_keeps_its_latest(migrated_db: str) -> None:
    busy, quiet = new_pool(), new_pool()
    long_ago = utcnow() - timedelta(seconds=settings.worker_row_retention_s + 60)
    old = [heartbeat(busy) for _ in range(3)]  # gone a week and more: replaced by newer ones
    live = heartbeat(busy)
    forgotten = [heartbeat(quiet) for _ in range(2)]  # a pool whose workers are all long gone
    with session_scope() as session:
        for i, name in enumerate(old + forgotten):
            session.execute(update(Worker).where(Worker.name == name).values(last_seen=long_ago - timedelta(hours=i)))
        pools.record_stopped(session=session, name=old[0])  # a clean stop counts as its last sign of life
        session.execute(update(Worker).where(Worker.name == old[0]).values(stopped_at=long_ago))
    reaper.recover_once()
    with session_scope() as session:
        left = set(session.scalars(select(Worker.name).where(Worker.pool.in_([busy, quiet]))))
        states = pools.pool_states(session=session)
    assert left == {live, forgotten[0]}  # the quiet pool keeps its most recently seen worker
    assert quiet in pools.known_pools(states) and states[quiet].live_workers == 0
    assert states[busy].live_workers == 1
