"""Issue 14, item 9: an admin key administers its own project, not the server.

The attack: an admin key of project `alpha` minted keys for `beta` and an admin key for
`default`. Now a project admin manages its own project's keys only; creating projects
and touching other projects' keys needs a server admin (the bootstrap key, keys made
with `api.admin create-key --server-admin`, or by another server admin)."""

from __future__ import annotations

import httpx

from tests.security.conftest import Tenant


def test_a_project_admin_cannot_administer_other_projects(stack, make_tenant) -> None:  # noqa: ANN001
    alpha: Tenant = make_tenant("alpha", admin=True)
    beta: Tenant = make_tenant("beta")

    # The attack as reported: keys for another project, an admin key for `default`.
    for project, body in [(beta.project, {"label": "stolen"}), ("default", {"admin": True})]:
        minted = alpha.api.post(f"/v1/projects/{project}/keys", json=body)
        assert minted.status_code == 403, minted.text
        assert "server-admin" in minted.json()["detail"]
    # Nor listing them, nor revoking one (another project's key id is unknown to it),
    # nor creating projects, nor making itself a server admin.
    assert alpha.api.get(f"/v1/projects/{beta.project}/keys").status_code == 403
    [beta_key] = stack.api.get(f"/v1/projects/{beta.project}/keys").json()
    assert alpha.api.delete(f"/v1/keys/{beta_key['id']}").status_code == 404
    assert beta.api.get("/v1/jobs").status_code == 200  # beta's key still works
    assert alpha.api.post("/v1/projects", json={"name": f"{alpha.project}-x"}).status_code == 403
    escalated = alpha.api.post(f"/v1/projects/{alpha.project}/keys", json={"server_admin": True})
    assert escalated.status_code == 403, escalated.text

    # Its own project it does administer: keys, admin keys, listing, revoking.
    own = alpha.api.post(f"/v1/projects/{alpha.project}/keys", json={"label": "ci"})
    assert own.status_code == 201 and own.json()["project"] == alpha.project
    assert own.json()["admin"] is False and own.json()["server_admin"] is False
    assert alpha.api.post(f"/v1/projects/{alpha.project}/keys", json={"admin": True}).status_code == 201
    assert {k["id"] for k in alpha.api.get(f"/v1/projects/{alpha.project}/keys").json()} >= {own.json()["id"]}
    assert alpha.api.delete(f"/v1/keys/{own.json()['id']}").status_code == 204
    refused = httpx.get(str(stack.api.base_url.join("/v1/jobs")), headers={"Authorization": f"Bearer {own.json()['key']}"})
    assert refused.status_code == 401


def test_a_server_admin_administers_every_project(stack, make_tenant) -> None:  # noqa: ANN001
    alpha: Tenant = make_tenant("alpha")
    # The bootstrap key is a server admin; it makes another server admin, who can do what it can.
    made = stack.api.post("/v1/projects/default/keys", json={"server_admin": True, "label": "ops"})
    assert made.status_code == 201 and made.json()["server_admin"] is True and made.json()["admin"] is True
    ops = httpx.Client(base_url=stack.api.base_url, headers={"Authorization": f"Bearer {made.json()['key']}"})
    with ops:
        minted = ops.post(f"/v1/projects/{alpha.project}/keys", json={"admin": True})
        assert minted.status_code == 201 and minted.json()["project"] == alpha.project
        assert ops.get(f"/v1/projects/{alpha.project}/keys").status_code == 200
        assert ops.delete(f"/v1/keys/{minted.json()['id']}").status_code == 204
        assert ops.post("/v1/projects", json={"name": f"{alpha.project}-y"}).status_code == 201
        # A server admin still sees only its own project's work.
        job = alpha.api.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 1})
        assert job.status_code == 201, job.text
        assert ops.get(f"/v1/jobs/{job.json()['id']}").status_code == 404
        alpha.api.post(f"/v1/jobs/{job.json()['id']}/cancel")
    # A project admin cannot revoke a server-admin key, even one of its own project.
    default_admin = stack.api.post("/v1/projects/default/keys", json={"admin": True}).json()
    with httpx.Client(base_url=stack.api.base_url, headers={"Authorization": f"Bearer {default_admin['key']}"}) as pa:
        assert pa.delete(f"/v1/keys/{made.json()['id']}").status_code == 403
    assert stack.api.delete(f"/v1/keys/{made.json()['id']}").status_code == 204
