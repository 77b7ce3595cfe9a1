"""API keys and projects through the API and the admin CLI: who gets in, and who
sees what. A key never sees another project's objects; ids do not leak."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from jobs.db import session_scope
from jobs.models import ApiKey

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_JOB = {"dataset": {"name": "iris"}, "epochs": 1}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_project(client: TestClient) -> str:
    name = f"p-{uuid.uuid4().hex[:12]}"
    response = client.post("/v1/projects", json={"name": name})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == name
    return name


def new_key(client: TestClient, project: str, **body: object) -> dict:
    response = client.post(f"/v1/projects/{project}/keys", json=body)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("dsk_not-a-key"), {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer "}],
    ids=["none", "unknown", "basic", "empty"],
)
def test_every_v1_route_needs_a_valid_key(client: TestClient, headers: dict[str, str]) -> None:
    anonymous = {"Authorization": ""} if not headers else headers
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{uuid.uuid4()}"),
                         ("GET", "/v1/catalog"), ("POST", "/v1/projects")]:  # fmt: skip
        response = client.request(method, path, headers=anonymous, json=SMALL_JOB if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in response.json()["detail"]
    # Probes stay open: load balancers and compose health checks carry no key.
    assert client.get("/healthz", headers=anonymous).status_code == 200


def test_a_key_sees_only_its_own_projects_jobs(client: TestClient) -> None:
    alice = bearer(new_key(client, new_project(client))["key"])
    bob = bearer(new_key(client, new_project(client))["key"])
    job = client.post("/v1/jobs", json=SMALL_JOB, headers=alice).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).status_code == 200

    # Bob's key: the job does not exist (404, as for an unknown id, never 403).
    for method, path in [("GET", f"/v1/jobs/{job['id']}"), ("POST", f"/v1/jobs/{job['id']}/cancel"),
                         ("GET", f"/v1/jobs/{job['id']}/metrics")]:  # fmt: skip
        response = client.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {"detail": f"job {job['id']} not found"}
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    # Nor does an admin of another project see it: admin keys administer keys, not other people's work.
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs", headers=alice).json()["items"]] == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"  # Bob's cancel did nothing


def test_idempotency_keys_belong_to_a_project(client: TestClient) -> None:
    alice = bearer(new_key(client, new_project(client))["key"])
    bob = bearer(new_key(client, new_project(client))["key"])
    retry = {"Idempotency-Key": "submit-1"}
    first = client.post("/v1/jobs", json=SMALL_JOB, headers=alice | retry)
    other = client.post("/v1/jobs", json=SMALL_JOB | {"epochs": 2}, headers=bob | retry)
    assert (first.status_code, other.status_code) == (201, 201)  # Bob's key is not Alice's
    again = client.post("/v1/jobs", json=SMALL_JOB, headers=alice | retry)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_only_admin_keys_administer(client: TestClient) -> None:
    project = new_project(client)
    member = new_key(client, project, label="ci")
    assert member["admin"] is False and member["label"] == "ci" and member["key"].startswith("dsk_")
    as_member = bearer(member["key"])
    for method, path, body, needs in [("POST", "/v1/projects", {"name": "mine"}, "a server-admin"),
                                      ("POST", f"/v1/projects/{project}/keys", {}, "an admin"),
                                      ("GET", f"/v1/projects/{project}/keys", None, "an admin"),
                                      ("DELETE", f"/v1/keys/{member['id']}", None, "an admin")]:  # fmt: skip
        response = client.request(method, path, headers=as_member, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json() == {"detail": f"this needs {needs} API key"}
    # An admin key of a project manages that project's keys, and nothing beyond it.
    admin = bearer(new_key(client, project, admin=True)["key"])
    made = client.post(f"/v1/projects/{project}/keys", json={"admin": True}, headers=admin)
    assert made.status_code == 201 and made.json()["admin"] is True and made.json()["server_admin"] is False
    assert client.delete(f"/v1/keys/{member['id']}", headers=admin).status_code == 204
    assert client.post("/v1/projects", json={"name": f"q-{uuid.uuid4().hex[:8]}"}, headers=admin).status_code == 403
    # A server-admin key (made by the bootstrap key, itself one) creates projects.
    server = new_key(client, project, server_admin=True)
    assert server["admin"] is True and server["server_admin"] is True
    created = client.post("/v1/projects", json={"name": f"q-{uuid.uuid4().hex[:8]}"}, headers=bearer(server["key"]))
    assert created.status_code == 201


def test_a_revoked_key_is_refused_at_once(client: TestClient) -> None:
    project = new_project(client)
    created = new_key(client, project)
    key = bearer(created["key"])
    assert client.get("/v1/jobs", headers=key).status_code == 200
    assert client.delete(f"/v1/keys/{created['id']}").status_code == 204
    refused = client.get("/v1/jobs", headers=key)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]
    assert client.delete(f"/v1/keys/{created['id']}").status_code == 204  # twice is harmless
    [listed] = client.get(f"/v1/projects/{project}/keys").json()
    assert listed["id"] == created["id"] and listed["revoked_at"] is not None and "key" not in listed
    assert client.delete(f"/v1/keys/{uuid.uuid4()}").status_code == 404
    assert client.delete("/v1/keys/not-an-id").status_code == 404


def test_keys_are_stored_hashed_and_shown_once(client: TestClient) -> None:
    project = new_project(client)
    created = new_key(client, project)
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == uuid.UUID(created["id"])))
        stored = [str(v) for v in vars(row).values()]
    assert not any(created["key"] in value for value in stored)  # only the digest and a short prefix
    assert created["key"].startswith(row.prefix) and len(row.prefix) < len(created["key"]) // 3
    assert all("key" not in k for k in client.get(f"/v1/projects/{project}/keys").json())


def test_bad_project_requests_name_the_reason(client: TestClient) -> None:
    project = new_project(client)
    duplicate = client.post("/v1/projects", json={"name": project})
    assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
    bad = client.post("/v1/projects", json={"name": "Not A Name!"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "name"
    unknown = client.post("/v1/projects/no-such-project/keys", json={})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["detail"]
    assert client.get("/v1/projects/no-such-project/keys").status_code == 404


def test_refusals_are_logged_without_the_key(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    secret = "dsk_" + uuid.uuid4().hex
    with caplog.at_level(logging.INFO, logger="api.deps"):
        assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 401
    assert "unknown or revoked API key" in caplog.text and "/v1/jobs" in caplog.text
    assert secret not in caplog.text and secret[4:12] not in caplog.text


def admin_cli(*args: str, unit_env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.admin", *args], cwd=REPO_ROOT, env=os.environ | unit_env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_the_admin_cli_makes_the_first_key(client: TestClient, unit_env: dict[str, str]) -> None:
    project = f"cli-{uuid.uuid4().hex[:8]}"
    made = admin_cli("create-key", "--project", project, "--create-project", "--server-admin", "--label", "ops",
                     unit_env=unit_env)  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()  # stdout holds the key alone, for `KEY=$(python -m api.admin create-key ...)`
    assert key.startswith("dsk_") and "shown once" in made.stderr and "server-admin key" in made.stderr
    assert client.post("/v1/projects", json={"name": f"{project}-b"}, headers=bearer(key)).status_code == 201

    listed = admin_cli("list-keys", "--project", project, unit_env=unit_env)
    assert listed.returncode == 0 and key[:12] in listed.stdout and key not in listed.stdout
    key_id = listed.stdout.splitlines()[1].split()[0]
    assert admin_cli("revoke-key", key_id, unit_env=unit_env).returncode == 0
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 401

    unknown = admin_cli("create-key", "--project", "nobody-" + uuid.uuid4().hex[:6], unit_env=unit_env)
    assert unknown.returncode == 2 and "does not exist" in unknown.stderr


def test_jobs_and_studies_record_the_key_that_submitted_them(client: TestClient) -> None:
    # Their MLflow runs name it (`mlflow.user`): its label, else its prefix; a study's trials its study's.
    from jobs.access import key_name
    from jobs.models import Job, Study

    project = new_project(client)
    labelled = new_key(client, project, label="  alice's\nlaptop ")
    unlabelled = new_key(client, project)
    job = client.post("/v1/jobs", json=SMALL_JOB, headers=bearer(labelled["key"])).json()
    other = client.post("/v1/jobs", json=SMALL_JOB, headers=bearer(unlabelled["key"])).json()
    booted = client.post("/v1/jobs", json=SMALL_JOB).json()  # the bootstrap key: no key row
    study_body = {"name": "who", "base": SMALL_JOB, "space": {"optimizer.lr": {"grid": [0.01, 0.1]}}}
    study = client.post("/v1/studies", json=study_body, headers=bearer(unlabelled["key"])).json()
    with session_scope() as session:
        rows = {j: session.get(Job, uuid.UUID(j)) for j in (job["id"], other["id"], booted["id"])}
        assert str(rows[job["id"]].submitted_by_key_id) == labelled["id"]
        assert str(rows[other["id"]].submitted_by_key_id) == unlabelled["id"]
        assert rows[booted["id"]].submitted_by_key_id is None
        assert key_name(session=session, key_id=rows[job["id"]].submitted_by_key_id) == "alice's laptop"
        assert key_name(session=session, key_id=rows[other["id"]].submitted_by_key_id) == unlabelled["prefix"]
        assert key_name(session=session, key_id=None) is None
        assert str(session.get(Study, uuid.UUID(study["id"])).submitted_by_key_id) == unlabelled["id"]
        trials = session.scalars(select(Job).where(Job.study_id == uuid.UUID(study["id"]))).all()
        assert trials and {str(t.submitted_by_key_id) for t in trials} == {unlabelled["id"]}
