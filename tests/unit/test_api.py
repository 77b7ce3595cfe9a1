"""The v1 API through FastAPI's TestClient, on the unit suite's SQLite database and
SQLite Celery broker (see conftest.py), plus the guarded state machine underneath it."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from api.main import app
from jobs import repository
from jobs.db import session_scope
from jobs.models import Job, JobEvent
from jobs.settings import settings
from jobs.spec import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, JobSpec, LossName
from jobs.states import JobStatus

REPO_ROOT = Path(__file__).resolve().parents[2]
ISSUE_EXAMPLE = json.loads((REPO_ROOT / "examples" / "adam-digits.json").read_text())

SMALL_JOB = {
    "name": "unit-iris",
    "dataset": {"name": "iris"},
    "model": {"arch": "mlp", "hidden": [8]},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "epochs": 2,
    "batch_size": 16,
}



@pytest.fixture()
def no_jobs(migrated_db: str) -> None:
    """An empty jobs table, for tests that count what a listing returns."""
    with session_scope() as session:
        session.execute(delete(JobEvent))
        session.execute(delete(Job))


def submit(client: TestClient, **overrides) -> dict:  # noqa: ANN003
    response = client.post("/v1/jobs", json=SMALL_JOB | overrides)
    assert response.status_code == 201, response.text
    return response.json()


def events_of(job_id: str) -> list[tuple[str | None, str]]:
    with session_scope() as session:
        return [
            (e.from_status, e.to_status) for e in repository.list_events(session=session, job_id=uuid.UUID(job_id))
        ]


def status_in_db(job_id: uuid.UUID) -> str:
    with session_scope() as session:
        return session.scalar(select(Job.status).where(Job.id == job_id))


# --------------------------------------------------------------------------- submit


def test_submit_returns_the_job_with_every_default_filled(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=SMALL_JOB)
    assert response.status_code == 201
    body = response.json()

    assert set(body) == {
        "id", "project", "name", "status", "spec", "created_at", "started_at", "trained_at", "finished_at",
        "attempts", "progress", "metrics", "mlflow", "error", "study", "diagnostics", "waiting_reason",
    }  # fmt: skip
    uuid.UUID(body["id"])
    assert body["name"] == "unit-iris"
    assert body["status"] == "queued"
    # every default, the server's timeout (DEFAULT_TIMEOUT_S) included
    expected = JobSpec.model_validate(SMALL_JOB | {"timeout_s": settings.default_timeout_s})
    assert body["spec"] == expected.model_dump(mode="json")
    assert body["spec"]["optimizer"] == {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
    assert body["spec"]["schedule"] == {"name": "constant"}
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None
    assert body["started_at"] is None and body["trained_at"] is None and body["finished_at"] is None
    assert body["attempts"] == 0
    assert body["progress"] == {"epoch": 0, "step": 0, "total_steps": 16, "fraction": 0.0}  # 2 x ceil(120 / 16)
    assert body["metrics"] == {"train_loss": None, "train_accuracy": None, "val_loss": None, "val_accuracy": None}
    assert body["mlflow"] == {"experiment_id": None, "run_id": None, "run_url": None}
    assert body["error"] is None

    assert client.get(f"/v1/jobs/{body['id']}").json() == body
    assert events_of(body["id"]) == [(None, "queued")]


def test_submit_with_an_empty_body_runs_the_default_job(client: TestClient) -> None:
    body = client.post("/v1/jobs", json={}).json()
    assert body["spec"] == JobSpec(timeout_s=settings.default_timeout_s).model_dump(mode="json")
    assert body["progress"]["total_steps"] == JobSpec().total_steps


def test_submit_issue_example(client: TestClient) -> None:
    example = ISSUE_EXAMPLE
    body = submit(client, **example)
    assert body["progress"]["total_steps"] == 460
    assert body["spec"]["optimizer"]["betas"] == [0.9, 0.999]


# --------------------------------------------------------------------------- 422s name the field


def count_jobs() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"optimizer": {"name": "sgd", "lr": -1}}, "optimizer.lr"),
        ({"optimizer": {"name": "adam", "lr": 0}}, "optimizer.lr"),
        ({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, "optimizer.betas"),
        ({"optimizer": {"name": "sgd", "nesterov": True}}, "optimizer.nesterov"),
        ({"dataset": {"name": "digits", "val_fraction": 1.5}}, "dataset.val_fraction"),
        ({"dataset": {"name": "digits", "val_fraction": 0}}, "dataset.val_fraction"),
        ({"dataset": {"name": "iris", "val_fraction": 0.01}}, "dataset.val_fraction"),
        ({"schedule": {"name": "warmup_cosine", "warmup_steps": 16}}, "schedule.warmup_steps"),
        ({"schedule": {"name": "cosine", "min_lr": 0.5}}, "schedule.min_lr"),
        ({"model": {"arch": "mlp", "dropout": 1.5}}, "model.dropout"),
        ({"model": {"arch": "mlp", "hidden": [0]}}, "model.hidden.0"),
        ({"epochs": 0}, "epochs"),
        ({"loss": "hinge"}, "loss"),
        ({"unknown_key": 1}, "unknown_key"),
    ],
)
def test_bad_spec_is_a_422_naming_the_field(client: TestClient, payload: dict, field: str) -> None:
    before = count_jobs()
    response = client.post("/v1/jobs", json=SMALL_JOB | payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert [d["field"] for d in body["detail"]] == [field]
    assert body["detail"][0]["msg"]
    assert field in body["message"]
    assert count_jobs() == before  # nothing half-written


def test_unknown_optimizer_lists_the_valid_names(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=SMALL_JOB | {"optimizer": {"name": "lion", "lr": 0.1}})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["field"] == "optimizer"
    assert "lion" in detail["msg"]
    for name in OPTIMIZERS:
        assert name in detail["msg"]


@pytest.mark.parametrize(("field", "tag"), [("dataset", "name"), ("schedule", "name"), ("model", "arch")])
def test_unknown_name_of_each_concept_is_a_422(client: TestClient, field: str, tag: str) -> None:
    response = client.post("/v1/jobs", json=SMALL_JOB | {field: {tag: "nope"}})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["field"] == field
    assert "nope" in detail["msg"] and "valid names" in detail["msg"]


def test_missing_discriminator_points_at_the_catalog(client: TestClient) -> None:
    response = client.post("/v1/jobs", json=SMALL_JOB | {"optimizer": {"lr": 0.1}})
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["field"] == "optimizer"
    assert "/v1/catalog" in detail["msg"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_lr_in_the_body_is_a_422(client: TestClient, token: str) -> None:
    response = client.post(
        "/v1/jobs",
        content='{"optimizer": {"name": "sgd", "lr": %s}}' % token,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["detail"]] == ["optimizer.lr"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"a string"', ""])
def test_malformed_body_is_a_422_not_a_500(client: TestClient, content: str) -> None:
    response = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text


# --------------------------------------------------------------------------- read


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert response.status_code == 404
    assert "not found" in response.json()["detail"]


@pytest.mark.parametrize("job_id", ["not-a-uuid", "1", "x" * 5000, "00000000-0000-0000-0000-00000000000g", "%00"])
def test_malformed_job_id_is_404_not_500(client: TestClient, job_id: str) -> None:
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/metrics").status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 404


def test_metrics_of_a_job_without_a_run_are_empty(client: TestClient) -> None:
    job = submit(client)
    response = client.get(f"/v1/jobs/{job['id']}/metrics")
    assert response.status_code == 200
    assert response.json() == {}
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/metrics").status_code == 404


def test_progress_metrics_and_mlflow_link_show_in_the_job(client: TestClient) -> None:
    job = submit(client)
    job_id = uuid.UUID(job["id"])
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=job_id) == 1
        repository.set_mlflow_run(session=session, job_id=job_id, experiment_id="7", run_id="abc123")
        status = repository.record_progress(
            session=session,
            job_id=job_id,
            epoch=1,
            step=5,
            metrics={"train_loss": 0.5, "val_accuracy": 0.75, "unrelated": 3.0},
        )
    assert status == JobStatus.running

    body = client.get(f"/v1/jobs/{job['id']}").json()
    assert body["status"] == "running"
    assert body["attempts"] == 1
    assert datetime.fromisoformat(body["started_at"]) >= datetime.fromisoformat(body["created_at"])
    assert body["progress"] == {"epoch": 1, "step": 5, "total_steps": 16, "fraction": round(5 / 16, 4)}
    assert body["metrics"] == {"train_loss": 0.5, "train_accuracy": None, "val_loss": None, "val_accuracy": 0.75}
    assert body["mlflow"]["experiment_id"] == "7" and body["mlflow"]["run_id"] == "abc123"
    if settings.mlflow_ui_url:
        assert body["mlflow"]["run_url"] == (
            f"{settings.mlflow_ui_url.rstrip('/')}/#/experiments/7/runs/abc123/model-metrics?workflowType=machine_learning"
        )
    else:
        assert body["mlflow"]["run_url"] is None


def test_failed_job_shows_its_error(client: TestClient) -> None:
    job = submit(client)
    job_id = uuid.UUID(job["id"])
    with session_scope() as session:
        repository.claim_job(session=session, job_id=job_id)
        repository.transition(
            session=session,
            job_id=job_id,
            expected=[JobStatus.running],
            to=JobStatus.failed,
            values={"error_type": "TrainingDiverged", "error_message": "diverged at step 3"},
        )
    body = client.get(f"/v1/jobs/{job['id']}").json()
    assert body["status"] == "failed"
    assert body["error"] == {"type": "TrainingDiverged", "message": "diverged at step 3"}
    assert body["finished_at"] is not None


# --------------------------------------------------------------------------- list


def walk(client: TestClient, **params) -> list[dict]:  # noqa: ANN003
    """Every page of a listing: [{"ids": [...], "next_cursor": ...}, ...]."""
    pages, cursor = [], None
    while True:
        query = params | ({"cursor": cursor} if cursor else {})
        response = client.get("/v1/jobs", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append({"ids": [item["id"] for item in body["items"]], "next_cursor": body["next_cursor"]})
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50, "pagination does not end"


def test_list_is_newest_first_with_keyset_pagination(client: TestClient, no_jobs: None) -> None:
    created = [submit(client, name=f"page-{i}")["id"] for i in range(7)]

    pages = walk(client, limit=3)
    assert [len(p["ids"]) for p in pages] == [3, 3, 1]
    assert pages[-1]["next_cursor"] is None
    seen = [job_id for page in pages for job_id in page["ids"]]
    assert seen == list(reversed(created))  # newest first, no duplicates, no gaps

    # A page that ends exactly at the last job has no cursor (no empty page after it).
    everything = client.get("/v1/jobs", params={"limit": 7}).json()
    assert [i["id"] for i in everything["items"]] == list(reversed(created))
    assert everything["next_cursor"] is None
    assert [p["ids"] for p in walk(client, limit=100)] == [list(reversed(created))]


def test_pagination_is_stable_while_jobs_are_added(client: TestClient, no_jobs: None) -> None:
    created = [submit(client)["id"] for _ in range(5)]
    first = client.get("/v1/jobs", params={"limit": 2}).json()
    newer = submit(client)["id"]  # arrives between two page reads
    ids = [i["id"] for i in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/v1/jobs", params={"limit": 2, "cursor": cursor}).json()
        ids += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
    assert ids == list(reversed(created))
    assert newer not in ids


def test_list_filters_by_status(client: TestClient, no_jobs: None) -> None:
    ids = [uuid.UUID(submit(client)["id"]) for _ in range(4)]
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=ids[0])
        repository.request_cancel(session=session, job_id=ids[2])
        repository.claim_job(session=session, job_id=ids[3])

    def listed(status: str) -> list[str]:
        response = client.get("/v1/jobs", params={"status": status})
        assert response.status_code == 200
        assert all(item["status"] == status for item in response.json()["items"])
        return [item["id"] for item in response.json()["items"]]

    assert listed("cancelled") == [str(ids[2]), str(ids[0])]
    assert listed("queued") == [str(ids[1])]
    assert listed("running") == [str(ids[3])]
    assert listed("succeeded") == []
    assert [p["ids"] for p in walk(client, status="cancelled", limit=1)] == [[str(ids[2])], [str(ids[0])]]


@pytest.mark.parametrize(
    "params",
    [
        {"status": "bogus"},
        {"status": "QUEUED"},
        {"limit": 0},
        {"limit": 1000},
        {"limit": -1},
        {"limit": "ten"},
        {"cursor": "zzzz"},
        {"cursor": "!!!"},
        {"cursor": base64.urlsafe_b64encode(b"a|b").decode()},
        {"cursor": base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|not-a-uuid").decode()},
        {"cursor": base64.urlsafe_b64encode(b"yesterday|" + str(uuid.uuid4()).encode()).decode()},
        {"cursor": base64.urlsafe_b64encode(b"\xff\xfe|\x00").decode()},
        {"cursor": "A" * 1000},
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, params: dict) -> None:
    response = client.get("/v1/jobs", params=params)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["field"] == next(iter(params))


# --------------------------------------------------------------------------- cancel


def test_cancel_a_queued_job(client: TestClient) -> None:
    job = submit(client)
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["id"] == job["id"]
    assert body["status"] == "cancelled"
    assert body["finished_at"] is not None
    assert datetime.fromisoformat(body["finished_at"]) >= datetime.fromisoformat(body["created_at"])
    assert events_of(job["id"]) == [(None, "queued"), ("queued", "cancelled")]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_cancelling_an_ended_job_is_409(client: TestClient) -> None:
    job = submit(client)
    with session_scope() as session:
        repository.request_cancel(session=session, job_id=uuid.UUID(job["id"]))  # queued -> cancelled
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409, response.text
    assert "cancelled" in response.json()["detail"]
    assert events_of(job["id"]) == [(None, "queued"), ("queued", "cancelled")]  # nothing more written


def test_cancel_twice_through_the_api(client: TestClient) -> None:
    job = submit(client)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_cancel_a_running_job_asks_it_to_stop(client: TestClient) -> None:
    job = submit(client)
    with session_scope() as session:
        repository.claim_job(session=session, job_id=uuid.UUID(job["id"]))
    response = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "cancelling"
    assert response.json()["finished_at"] is None
    # Asking again is accepted and changes nothing.
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    assert events_of(job["id"]) == [(None, "queued"), ("queued", "running"), ("running", "cancelling")]


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


# --------------------------------------------------------------------------- catalog and probes


def test_catalog_lists_every_registered_name(client: TestClient) -> None:
    response = client.get("/v1/catalog")
    assert response.status_code == 200
    catalog = response.json()
    assert [d["name"] for d in catalog["datasets"]] == list(DATASETS)
    assert [o["name"] for o in catalog["optimizers"]] == list(OPTIMIZERS)
    assert [s["name"] for s in catalog["schedules"]] == list(SCHEDULES)
    assert [loss["name"] for loss in catalog["losses"]] == [str(n) for n in LossName]
    assert [m["name"] for m in catalog["models"]] == list(MODELS)
    assert JobSpec.model_validate(catalog["job"]["example"]) == JobSpec()


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"database": "ok", "broker": "ok"}


def test_openapi_schema_builds(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/jobs" in schema["paths"] and "/v1/jobs/{job_id}/cancel" in schema["paths"]


def test_api_does_not_import_torch(unit_env: dict) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import api.main, sys; assert 'torch' not in sys.modules, 'torch was imported'"],
        cwd=REPO_ROOT,
        env=os.environ | unit_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- the guarded state machine


@pytest.fixture()
def queued_job(migrated_db: str) -> uuid.UUID:
    with session_scope() as session:
        job, _ = repository.create_job(session=session, spec=JobSpec.model_validate(SMALL_JOB))
        return job.id


def test_claim_is_exactly_once(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=queued_job) == 1
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=queued_job) is None  # duplicate delivery
    with session_scope() as session:
        job = repository.get_job(session=session, job_id=queued_job)
        assert job.status == JobStatus.running
        assert job.attempts == 1
        assert job.started_at is not None and job.finished_at is None
    assert events_of(str(queued_job)) == [(None, "queued"), ("queued", "running")]


def test_claim_of_unknown_or_cancelled_job_is_none(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=uuid.uuid4()) is None
        assert repository.request_cancel(session=session, job_id=queued_job).status == JobStatus.cancelled
    with session_scope() as session:
        assert repository.claim_job(session=session, job_id=queued_job) is None
    assert status_in_db(queued_job) == "cancelled"


def test_transition_from_an_unexpected_status_writes_nothing(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        moved = repository.transition(
            session=session, job_id=queued_job, expected=[JobStatus.running], to=JobStatus.succeeded
        )
        assert moved is None
    with session_scope() as session:
        job = repository.get_job(session=session, job_id=queued_job)
        assert job.status == JobStatus.queued and job.finished_at is None
    assert events_of(str(queued_job)) == [(None, "queued")]


def test_transition_not_in_the_state_machine_is_refused(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        # queued -> succeeded is not an allowed move even when the caller expects queued.
        assert (
            repository.transition(session=session, job_id=queued_job, expected=[JobStatus.queued], to=JobStatus.succeeded)
            is None
        )
        assert repository.transition(session=session, job_id=queued_job, expected=[JobStatus.queued], to=JobStatus.queued) is None
    assert status_in_db(queued_job) == "queued"
    assert events_of(str(queued_job)) == [(None, "queued")]


def test_full_life_is_recorded_with_timestamps(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        repository.claim_job(session=session, job_id=queued_job)
    with session_scope() as session:
        moved = repository.transition(
            session=session,
            job_id=queued_job,
            expected=[JobStatus.running, JobStatus.cancelling],
            to=JobStatus.succeeded,
            detail="done",
        )
        assert moved == JobStatus.running
    with session_scope() as session:
        events = repository.list_events(session=session, job_id=queued_job)
        job = repository.get_job(session=session, job_id=queued_job)
        assert [(e.from_status, e.to_status) for e in events] == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]
        assert events[-1].detail == "done"
        assert all(e.at.tzinfo is not None for e in events)
        assert events[0].at <= events[1].at <= events[2].at
        assert job.finished_at == events[-1].at
        # Terminal: nothing moves it any more.
        assert repository.transition(session=session, job_id=queued_job, expected=list(JobStatus), to=JobStatus.failed) is None


def test_request_cancel_of_a_running_job(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        repository.claim_job(session=session, job_id=queued_job)
    with session_scope() as session:
        outcome = repository.request_cancel(session=session, job_id=queued_job)
        assert outcome == repository.CancelOutcome(accepted=True, status=JobStatus.cancelling)
    with session_scope() as session:
        # A second request is accepted and writes nothing.
        assert repository.request_cancel(session=session, job_id=queued_job) == repository.CancelOutcome(
            accepted=True, status=JobStatus.cancelling
        )
        # The worker sees it through its progress write and stops.
        assert (
            repository.record_progress(session=session, job_id=queued_job, epoch=1, step=3, metrics={})
            == JobStatus.cancelling
        )
    assert status_in_db(queued_job) == "cancelling"
    with session_scope() as session:
        assert repository.transition(
            session=session, job_id=queued_job, expected=[JobStatus.cancelling], to=JobStatus.cancelled
        ) == JobStatus.cancelling
    with session_scope() as session:
        assert repository.request_cancel(session=session, job_id=queued_job) == repository.CancelOutcome(
            accepted=False, status=JobStatus.cancelled
        )
        assert repository.request_cancel(session=session, job_id=uuid.uuid4()) is None
    assert events_of(str(queued_job)) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "cancelling"),
        ("cancelling", "cancelled"),
    ]


def test_progress_of_a_job_that_is_not_running_is_not_written(queued_job: uuid.UUID) -> None:
    with session_scope() as session:
        status = repository.record_progress(session=session, job_id=queued_job, epoch=2, step=9, metrics={"x": 1.0})
        assert status == JobStatus.queued
    with session_scope() as session:
        job = repository.get_job(session=session, job_id=queued_job)
        assert (job.epoch, job.step, job.latest_metrics) == (0, 0, {})


def test_parse_uuid() -> None:
    value = uuid.uuid4()
    assert repository.parse_uuid(str(value)) == value
    for raw in ("", "1", "not-a-uuid", "x" * 10_000, None):
        assert repository.parse_uuid(raw) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- other settings, in a fresh process
#
# The settings singleton is built once per process, so an unreachable broker or a
# different MLflow store is tried in a subprocess with its own database.

PRELUDE = """
import sys, uuid
from alembic import command
from alembic.config import Config
config = Config()
config.set_main_option("script_location", "migrations")
command.upgrade(config, "head")
from fastapi.testclient import TestClient
from api.main import app
from jobs import repository
from jobs.db import session_scope
client = TestClient(app, raise_server_exceptions=False, headers={"Authorization": "Bearer unit-admin-4f1c9e7a2b6d8053e1a7c4f92d6b0e38"})
"""


def run_in_fresh_process(script: str, tmp_path: Path, **env: str) -> None:
    home = tmp_path / "home"
    environment = os.environ | {
        "DESCENT_HOME": str(home),
        "DATABASE_URL": f"sqlite:///{home}/t.db",
        "BROKER_URL": f"sqla+sqlite:///{home}/broker.db",
        "QUEUE_NAME": "unit-test",
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + script],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_unreachable_broker_still_records_the_job_queued(tmp_path: Path) -> None:
    script = """
import time
started = time.monotonic()
response = client.post("/v1/jobs", json={"dataset": {"name": "iris"}})
assert time.monotonic() - started < 20, "submission hung on the broker"
assert response.status_code == 201, response.text

# PostgreSQL is the truth: the job waits, queued, for the reaper to send it.
[job] = client.get("/v1/jobs").json()["items"]
assert job["status"] == "queued" and job["error"] is None, job
assert job["id"] == response.json()["id"]

ready = client.get("/readyz")
assert ready.status_code == 503, ready.text
assert ready.headers["retry-after"]
assert ready.json()["database"] == "ok" and ready.json()["broker"].startswith("unreachable"), ready.json()
"""
    run_in_fresh_process(script, tmp_path, BROKER_URL="redis://127.0.0.1:1/0")


def test_metrics_are_read_back_from_the_mlflow_run(tmp_path: Path) -> None:
    script = """
from jobs.tracking import tracking_client
mlflow = tracking_client()
experiment_id = mlflow.create_experiment("unit")
run_id = mlflow.create_run(experiment_id).info.run_id
for step, value in [(0, 1.0), (1, 0.5), (2, float("nan")), (3, float("inf"))]:
    mlflow.log_metric(run_id, "train_loss", value, step=step)
mlflow.log_metric(run_id, "val_accuracy", 0.9, step=3)

job_id = client.post("/v1/jobs", json={"dataset": {"name": "iris"}}).json()["id"]
with session_scope() as session:
    repository.set_mlflow_run(session=session, job_id=uuid.UUID(job_id), experiment_id=experiment_id, run_id=run_id)
response = client.get(f"/v1/jobs/{job_id}/metrics")
assert response.status_code == 200, response.text
assert response.json() == {
    "train_loss": [
        {"step": 0, "value": 1.0},
        {"step": 1, "value": 0.5},
        {"step": 2, "value": None},
        {"step": 3, "value": None},
    ],
    "val_accuracy": [{"step": 3, "value": 0.9}],
}, response.json()
"""
    # A SQLite tracking store: MLflow's file store is deprecated (and refused from 3.13 on).
    run_in_fresh_process(script, tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_unreachable_mlflow_is_a_503_for_metrics(tmp_path: Path) -> None:
    script = """
job_id = client.post("/v1/jobs", json={"dataset": {"name": "iris"}}).json()["id"]
with session_scope() as session:
    repository.set_mlflow_run(session=session, job_id=uuid.UUID(job_id), experiment_id="1", run_id="r1")
response = client.get(f"/v1/jobs/{job_id}/metrics")
assert response.status_code == 503, response.text
assert response.headers["retry-after"]
# The job itself still reads fine.
assert client.get(f"/v1/jobs/{job_id}").status_code == 200
"""
    run_in_fresh_process(
        script,
        tmp_path,
        MLFLOW_TRACKING_URI="http://127.0.0.1:1",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="2",
    )
