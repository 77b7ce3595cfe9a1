"""Issue 14, item 4: studies bypassed the job limits. Only the first 500 grid
combinations were validated, and trials created later skipped the MAX_* checks: a
1.3 KB study created trials with a 1,006,821,379-parameter model that POST /v1/jobs
refuses. And creating a large study took 19.7 s of Optuna asks.

Every configuration a grid produces is now validated at creation, every trial a
sampler proposes goes through the job gate (repository.create_job), and a study is
created in well under a second whatever its size."""

from __future__ import annotations

import time
from collections.abc import Callable

from jobs.spec import JobSpec
from tests.integration.conftest import Stack
from tests.security.conftest import Tenant

MAX_MODEL_PARAMETERS = 50_000_000  # the stack's (the setting's default)
HUGE = [8192] * 16  # 1,006,821,379 parameters on iris: the model
BASE = {"dataset": {"name": "iris"}, "optimizer": {"name": "sgd"}, "epochs": 1, "batch_size": 32, "seed": 3}
# Ten two-valued dimensions: 1,024 combinations for each model in the space.
FILLER = {
    "optimizer.lr": {"grid": [0.05, 0.1]},
    "optimizer.momentum": {"grid": [0.0, 0.9]},
    "optimizer.weight_decay": {"grid": [0.0, 0.0001]},
    "device": {"grid": ["auto", "cpu"]},
    "batch_size": {"grid": [16, 32]},
    "loss": {"grid": ["cross_entropy", "mse"]},
    "max_attempts": {"grid": [1, 2]},
    "dataset.val_fraction": {"grid": [0.2, 0.25]},
    "log_every_steps": {"grid": [1, 2]},
    "clip_grad_norm": {"grid": [None, 1.0]},
}


def parameters(spec: dict) -> int:
    job = JobSpec.model_validate(spec)
    return job.model.n_parameters(job.input_shape, job.dataset.n_classes)


def cancel(tenant: Tenant, study_id: str) -> None:
    tenant.api.post(f"/v1/studies/{study_id}/cancel")


def test_a_huge_model_after_the_500th_grid_combination_is_refused(make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("study-grid")
    # model.hidden varies slowest: the huge model is in combinations 513..768 only.
    space = {"model.hidden": {"grid": [[8], [16], HUGE]}} | {k: v for k, v in list(FILLER.items())[:8]}
    body = {"name": "grid-attack", "base": BASE, "space": space, "search": {"method": "grid", "parallelism": 1}}
    response = tenant.api.post("/v1/studies", json=body)
    if response.status_code == 201:
        cancel(tenant, response.json()["id"])
    assert response.status_code == 422, response.text[:500]
    problems = response.json()["detail"]
    assert any(p["field"] == "base.model" and "MAX_MODEL_PARAMETERS" in p["msg"] for p in problems), problems
    assert tenant.api.get("/v1/jobs").json()["items"] == []  # nothing was created


def test_a_sampled_configuration_over_the_job_limits_never_becomes_a_job(make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("study-sampled")
    big = [7_800, 7_800]  # ~61 M parameters: over MAX_MODEL_PARAMETERS, light enough should one ever run
    assert parameters(BASE | {"model": {"arch": "mlp", "hidden": big}}) > MAX_MODEL_PARAMETERS
    # The checks at creation see the first 1,000 categorical combinations only (all small
    # here); the sampler draws the big model for about half of its configurations.
    space = {"model.hidden": {"grid": [[8], big]}} | FILLER
    body = {"name": "sampled-attack", "base": BASE, "space": space,
            "search": {"method": "random", "max_trials": 8, "parallelism": 8}}  # fmt: skip
    response = tenant.api.post("/v1/studies", json=body)
    assert response.status_code == 201, response.text[:500]
    study = response.json()
    try:
        deadline = time.monotonic() + 30
        while (current := tenant.api.get(f"/v1/studies/{study['id']}").json())["configurations_started"] < 8:
            assert time.monotonic() < deadline, current
            time.sleep(0.5)
        trials = tenant.api.get("/v1/jobs", params={"study_id": study["id"], "limit": 100}).json()["items"]
        assert all(parameters(t["spec"]) <= MAX_MODEL_PARAMETERS for t in trials), "a trial over the limit was created"
        refused = current["invalid_configurations"]
        assert refused and len(trials) + len(refused) == 8, (len(trials), refused)
        assert all("MAX_MODEL_PARAMETERS" in r["error"] and r["values"]["model.hidden"] == big for r in refused)
    finally:
        cancel(tenant, study["id"])


def test_a_study_of_any_size_is_created_in_under_a_second(stack: Stack, make_tenant: Callable[..., Tenant]) -> None:
    tenant = make_tenant("study-size")
    # Room for the whole study, so that only its size is in the way (checked by the 201 below).
    room = {"max_active_jobs": 1000, "max_study_parallelism": 1000}
    stack.api.put(f"/v1/projects/{tenant.project}/limits", json=room)
    space = {"optimizer.lr": {"grid": [0.01 * (i + 1) for i in range(20)]}}
    body = {"name": "size-attack", "base": BASE, "space": space, "repeats": 50,
            "search": {"method": "grid", "parallelism": 256}}  # fmt: skip
    started = time.perf_counter()
    response = tenant.api.post("/v1/studies", json=body)
    took = time.perf_counter() - started
    assert response.status_code == 201, response.text[:500]
    cancel(tenant, response.json()["id"])
    print(f"study of {body['repeats'] * len(space['optimizer.lr']['grid'])} trials created in {took:.3f} s")
    assert took < 1.0, f"creating a 1,000-trial study took {took:.2f} s"
