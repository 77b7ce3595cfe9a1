"""Per-project quotas (429), the diagnostics cost cap and the default timeout, the job
gate holding a study's sampled configurations, the fair claim, and metric pages."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from api.routes.jobs import _metrics_page
from descent.client import Client
from jobs import repository, studies
from jobs.db import session_scope
from jobs.models import Base, Project
from jobs.settings import settings
from jobs.spec import JobSpec

IRIS = {"dataset": {"name": "iris"}, "epochs": 1}


@pytest.fixture
def tenant(client: TestClient) -> Iterator[tuple[str, TestClient]]:
    """A project of its own and a client holding a plain key of it."""
    name = f"unit-quota-{uuid.uuid4().hex[:8]}"
    assert client.post("/v1/projects", json={"name": name}).status_code == 201
    key = client.post(f"/v1/projects/{name}/keys", json={}).json()["key"]
    yield name, TestClient(client.app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"})


def test_a_project_at_its_job_limit_gets_a_429_naming_it(client: TestClient, tenant) -> None:
    name, own = tenant
    assert own.put(f"/v1/projects/{name}/limits", json={"max_active_jobs": 1}).status_code == 403  # admins only
    assert client.put(f"/v1/projects/{name}/limits", json={"max_active_jobs": 1}).status_code == 200
    assert client.put("/v1/projects/nope/limits", json={"max_active_jobs": 1}).status_code == 404
    assert client.put(f"/v1/projects/{name}/limits", json={"max_active_jobs": 0}).status_code == 422
    first = own.post("/v1/jobs", json=IRIS)
    assert first.status_code == 201
    refused = own.post("/v1/jobs", json=IRIS | {"seed": 1})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "30"
    assert refused.json()["limit"] == "max_active_jobs" and "PUT /v1/projects" in refused.json()["detail"]
    assert own.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 202
    assert own.post("/v1/jobs", json=IRIS | {"seed": 1}).status_code == 201  # room again
    # back to the server's setting
    reset = client.put(f"/v1/projects/{name}/limits", json={"max_active_jobs": None}).json()
    assert reset["max_active_jobs"] == settings.max_active_jobs_per_project
    assert reset["source"]["max_active_jobs"] == "server"


def test_the_server_setting_applies_to_every_project(tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    name, own = tenant
    monkeypatch.setattr(settings, "max_active_jobs_per_project", 1)
    assert own.post("/v1/jobs", json=IRIS).status_code == 201
    refused = own.post("/v1/jobs", json=IRIS | {"seed": 2})
    assert refused.status_code == 429 and "MAX_ACTIVE_JOBS_PER_PROJECT" in refused.json()["detail"]


def test_a_study_over_its_projects_parallelism_gets_a_429(client: TestClient, tenant) -> None:
    name, own = tenant
    client.put(f"/v1/projects/{name}/limits", json={"max_study_parallelism": 3})
    study = {"name": "p", "base": IRIS, "space": {"optimizer.lr": {"grid": [0.01, 0.02, 0.03, 0.04]}}}
    refused = own.post("/v1/studies", json=study | {"search": {"method": "grid", "parallelism": 4}})
    assert refused.status_code == 429 and refused.json()["limit"] == "max_study_parallelism"
    assert own.get("/v1/jobs").json()["items"] == []  # nothing half-written
    assert own.post("/v1/studies", json=study | {"search": {"method": "grid", "parallelism": 3}}).status_code == 201
    usage = own.get(f"/v1/projects/{name}/limits").json()
    assert usage["study_parallelism"] == 3 and usage["active_jobs"] == 3


def test_diagnostics_over_their_cost_cap_are_a_422_and_a_job_gets_the_default_timeout(client: TestClient) -> None:
    landscape = {"kind": "2d", "resolution": 101}
    expensive = {"dataset": {"name": "digits"}, "epochs": 1, "diagnostics": {"landscape": landscape}}
    response = client.post("/v1/jobs", json=expensive | {"model": {"arch": "mlp", "hidden": [2048, 2048]}})
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["field"] == "diagnostics" and "MAX_DIAGNOSTICS_COST" in problem["msg"]
    accepted = client.post("/v1/jobs", json=IRIS).json()
    assert accepted["spec"]["timeout_s"] == settings.default_timeout_s
    assert client.post("/v1/jobs", json=IRIS | {"timeout_s": 60}).json()["spec"]["timeout_s"] == 60


def test_a_sampled_configuration_over_a_limit_becomes_no_job(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = {"optimizer.lr": {"log_uniform": [1e-3, 1e-1]}, "model.hidden": {"grid": [[8], [64]]}}
    body = {"name": "sampled", "base": IRIS, "search": {"method": "random", "max_trials": 6, "parallelism": 1},
            "space": space}  # fmt: skip
    study = client.post("/v1/studies", json=body).json()
    [first] = client.get("/v1/jobs", params={"study_id": study["id"]}).json()["items"]
    client.post(f"/v1/jobs/{first['id']}/cancel")
    # The limit tightens after the checks at creation: what the sampler proposes meets the gate.
    monkeypatch.setattr(settings, "max_model_parameters", 10)
    with session_scope() as session:
        advance = studies.advance_study(session=session, study_id=uuid.UUID(study["id"]))
    assert advance.new_jobs == []
    current = client.get(f"/v1/studies/{study['id']}").json()
    assert current["configurations_started"] == 6 and current["status"] == "failed"
    assert len(current["invalid_configurations"]) == 5
    assert all("MAX_MODEL_PARAMETERS" in c["error"] for c in current["invalid_configurations"])


def test_a_message_runs_the_fairest_queued_job() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Project(name="busy"), Project(name="single")])
        spec = JobSpec.model_validate(IRIS)
        busy = [repository.create_job(session=session, spec=spec, project="busy")[0].id for _ in range(3)]
        single = repository.create_job(session=session, spec=spec, project="single")[0].id
        claims = [repository.claim_next_job(session=session) for _ in range(4)]
        # the oldest job first; then the project with nothing running; then the rest in order
        assert [c.job_id for c in claims] == [busy[0], single, busy[1], busy[2]]
        assert all(c.attempt == 1 for c in claims)
        assert repository.claim_next_job(session=session) is None  # nothing queued: the message is a no-op


def test_metric_pages_hold_whole_steps_up_to_the_limit() -> None:
    histories = {"loss": [{"step": s, "value": 1.0} for s in range(10)],
                 "acc": [{"step": s, "value": 0.5} for s in range(0, 10, 3)]}  # fmt: skip
    page, last = _metrics_page(histories, None, 5)
    assert page == {"loss": histories["loss"][:3], "acc": histories["acc"][:1]} and last == 2
    page, last = _metrics_page(histories, 2, 5)
    assert [p["step"] for p in page["loss"]] == [3, 4, 5] and [p["step"] for p in page["acc"]] == [3] and last == 5
    page, last = _metrics_page(histories, 8, 100)
    assert page == {"loss": [{"step": 9, "value": 1.0}], "acc": [{"step": 9, "value": 0.5}]} and last is None
    assert _metrics_page(histories, 9, 5) == ({}, None)
    page, last = _metrics_page(histories, None, 1)  # a step larger than the limit comes alone
    assert page == {"loss": histories["loss"][:1], "acc": histories["acc"][:1]} and last == 0


def test_the_client_reads_every_page_of_a_metric_history() -> None:
    pages = {
        None: ({"loss": [{"step": 0, "value": 1.0}, {"step": 1, "value": 0.9}]}, "after_step=1&limit=2"),
        "1": ({"loss": [{"step": 2, "value": 0.8}], "acc": [{"step": 2, "value": 0.5}]}, None),
    }

    def serve(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j/metrics"
        body, following = pages[request.url.params.get("after_step")]
        headers = {"Link": f'<{request.url.path}?{following}>; rel="next"'} if following else {}
        return httpx.Response(200, json=body, headers=headers)

    client = Client(url="http://descent.test", api_key="k")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(serve))
    assert client.metrics("j") == [
        {"metric": "acc", "step": 2, "value": 0.5},
        {"metric": "loss", "step": 0, "value": 1.0}, {"metric": "loss", "step": 1, "value": 0.9},
        {"metric": "loss", "step": 2, "value": 0.8},
    ]  # fmt: skip


def test_the_unfinished_jobs_index_covers_exactly_the_unfinished_statuses() -> None:
    """The quota's count (status NOT IN TERMINAL) uses the partial index only while both
    name the same statuses: a status added to TERMINAL must be added to the index too."""
    import re

    from jobs.models import Job
    from jobs.states import TERMINAL

    index = next(i for i in Job.__table__.indexes if i.name == "ix_jobs_project_unfinished")
    predicate = str(index.dialect_options["postgresql"]["where"])
    assert set(re.findall(r"'(\w+)'", predicate)) == {s.value for s in TERMINAL}
    migration = (Path(__file__).resolve().parents[2] / "migrations" / "versions"
                 / "0015_unfinished_jobs_index.py").read_text()  # fmt: skip
    assert set(re.findall(r"'(\w+)'", migration.split("FINISHED = ")[1].splitlines()[0])) == {s.value for s in TERMINAL}
