"""Issue 14, item 5 (quotas): nothing answered 429. One project could fill the queue
with jobs and parallelism-256 studies, ask for hours of Hessians and 101x101
landscapes, run without a timeout, and read a run's whole metric history in one
response. Now: per-project limits on jobs queued or running and on running studies'
parallelism (settings; per project by an admin), a 429 with Retry-After naming the
limit, a cost cap on diagnostics, a default timeout, and paged metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.integration.conftest import Stack
from tests.security.conftest import Tenant

JOB = {"dataset": {"name": "iris"}, "epochs": 400, "batch_size": 16}  # a few seconds each
STUDY = {"name": "quota", "base": {"dataset": {"name": "iris"}, "epochs": 20, "batch_size": 16},
         "space": {"optimizer.lr": {"grid": [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.3]}}}  # fmt: skip


def submitted(tenant: Tenant, spec: dict) -> dict:
    response = tenant.api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def assert_429(response, limit: str) -> None:
    assert response.status_code == 429, response.text[:500]
    assert int(response.headers["Retry-After"]) > 0
    body = response.json()
    assert body["limit"] == limit and "limit" in body["detail"], body


def test_a_project_holds_no_more_jobs_than_its_limit(stack: Stack, make_tenant: Callable[..., Tenant]) -> None:
    hog, other = make_tenant("quota-hog"), make_tenant("quota-other")
    # Only a server admin sets a project's limits: neither a project's plain key nor its admin can lift them.
    assert hog.api.put(f"/v1/projects/{hog.project}/limits", json={"max_active_jobs": 10_000}).status_code == 403
    hog_admin = stack.api.post(f"/v1/projects/{hog.project}/keys", json={"admin": True}).json()["key"]
    lifted = httpx.put(f"http://127.0.0.1:{stack.settings.api_port}/v1/projects/{hog.project}/limits", json={"max_active_jobs": 10_000},
                       headers={"Authorization": f"Bearer {hog_admin}"})  # fmt: skip
    assert lifted.status_code == 403, lifted.text
    assert stack.api.put(f"/v1/projects/{hog.project}/limits", json={"max_active_jobs": 3}).status_code == 200
    jobs = [submitted(hog, JOB | {"name": f"hog-{i}"}) for i in range(3)]
    try:
        assert_429(hog.api.post("/v1/jobs", json=JOB), "max_active_jobs")
        # a study's trials count too: the study waits for room, it creates none now
        study = hog.api.post("/v1/studies", json=STUDY | {"search": {"method": "grid", "parallelism": 2}})
        assert study.status_code == 201, study.text
        hog.api.post(f"/v1/studies/{study.json()['id']}/cancel")
        assert sum(study.json()["trials"].values()) == 0
        own = hog.api.get(f"/v1/projects/{hog.project}/limits").json()  # a project reads its own limits
        assert own["max_active_jobs"] == 3 and own["source"]["max_active_jobs"] == "project" and own["active_jobs"] == 3
        assert other.api.get(f"/v1/projects/{hog.project}/limits").status_code == 404  # not another's
        submitted(other, JOB | {"epochs": 1})  # the limit is the hog's alone
    finally:
        for job in jobs:
            hog.api.post(f"/v1/jobs/{job['id']}/cancel")
    deadline = time.monotonic() + 60
    while hog.api.get(f"/v1/projects/{hog.project}/limits").json()["active_jobs"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    hog.api.post(f"/v1/jobs/{submitted(hog, JOB | {'epochs': 1})['id']}/cancel")  # room again once they ended


def test_a_project_runs_studies_of_a_bounded_parallelism(stack: Stack, make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("quota-studies")
    assert stack.api.put(f"/v1/projects/{tenant.project}/limits", json={"max_study_parallelism": 4}).status_code == 200
    created: list[str] = []

    def submit(parallelism: int):
        search = {"method": "grid", "parallelism": parallelism}
        response = tenant.api.post("/v1/studies", json=STUDY | {"search": search})
        if response.status_code == 201:
            created.append(response.json()["id"])
        return response

    try:
        assert_429(submit(256), "max_study_parallelism")
        assert submit(4).status_code == 201
        assert_429(submit(1), "max_study_parallelism")
        assert tenant.api.post(f"/v1/studies/{created[0]}/cancel").status_code == 202
        again = submit(4)
        assert again.status_code == 201, again.text  # an ended study gives its parallelism back
    finally:
        for study_id in created:
            tenant.api.post(f"/v1/studies/{study_id}/cancel")


def test_hours_of_diagnostics_are_refused_and_every_job_has_a_timeout(make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("quota-diagnostics")
    model = {"arch": "mlp", "hidden": [1024, 1024]}  # 1.1 M parameters: within MAX_HESSIAN_PARAMETERS
    base = {"dataset": {"name": "digits"}, "model": model, "epochs": 1000}
    attacks = {
        "a 101x101 landscape": {"landscape": {"kind": "2d", "resolution": 101}},
        "a Hessian spectrum every epoch": {"hessian": {"every_epochs": 1, "top_k": 100}},
    }
    for what, diagnostics in attacks.items():
        response = tenant.api.post("/v1/jobs", json=base | {"diagnostics": diagnostics})
        if response.status_code == 201:
            tenant.api.post(f"/v1/jobs/{response.json()['id']}/cancel")
        assert response.status_code == 422, f"{what}: {response.text[:300]}"
        [problem] = response.json()["detail"]
        assert problem["field"] == "diagnostics" and "MAX_DIAGNOSTICS_COST" in problem["msg"], problem
    # what the diagnostics are for, at their defaults, is still accepted; and a job that
    # states no timeout gets the server's (DEFAULT_TIMEOUT_S, a day)
    job = submitted(tenant, base | {"epochs": 1, "diagnostics": {"hessian": {}, "landscape": {}}})
    tenant.api.post(f"/v1/jobs/{job['id']}/cancel")
    assert job["spec"]["timeout_s"] == 24 * 3600


def test_a_metric_history_is_read_a_page_at_a_time(make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("quota-metrics")
    job = submitted(tenant, {"dataset": {"name": "iris"}, "epochs": 10, "batch_size": 16})  # 80 steps
    deadline = time.monotonic() + 180
    while tenant.api.get(f"/v1/jobs/{job['id']}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    whole = tenant.api.get(f"/v1/jobs/{job['id']}/metrics")
    assert whole.status_code == 200 and "next" not in whole.links  # within the default page
    expected = {key: points for key, points in whole.json().items()}
    assert sum(len(points) for points in expected.values()) > 50

    pages, merged = 0, {}
    url: str | None = f"/v1/jobs/{job['id']}/metrics?limit=50"
    while url is not None:
        page = tenant.api.get(url)
        assert page.status_code == 200, page.text
        steps = {p["step"] for points in page.json().values() for p in points}
        # at most 50 points, whole steps only (a step with more comes alone)
        assert sum(len(points) for points in page.json().values()) <= 50 or len(steps) == 1
        for key, points in page.json().items():
            merged.setdefault(key, []).extend(points)
        url = page.links.get("next", {}).get("url")
        pages += 1
    assert pages > 1 and merged == expected
    too_big = tenant.api.get(f"/v1/jobs/{job['id']}/metrics", params={"limit": 10**9})
    assert too_big.status_code == 422 and "METRICS_PAGE_MAX" in too_big.text
