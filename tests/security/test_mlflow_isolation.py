"""Issue 14, item 8: MLflow is one server for every project.

Against a real stack whose `mlflow server` runs its basic-auth app with the shipped
deploy/mlflow-auth.ini (default_permission = NO_PERMISSIONS), two projects, alpha and beta:

- both run a study called `sweep` in an experiment called `shared`: before the fix they
  shared the experiment and the registered model, and alpha's study moved beta's `@best`;
- alpha's MLflow login (made with the project) can neither read nor write beta's runs,
  experiment or model, nor move beta's alias; beta's login reads its own;
- alpha's MLflow user creates beta's names in MLflow ahead of beta (any MLflow user may
  create any name and becomes its manager): beta's runs and model do not land in them.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from celery import Celery
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from launcher.stack import start_stack
from tests.integration.conftest import ADMIN_KEY, Stack, stack_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
MLFLOW_ADMIN = "admin"


def study_spec(name: str, experiment: str) -> dict:
    return {
        "name": name,
        "base": {"experiment": experiment, "dataset": {"name": "iris"}, "epochs": 2, "batch_size": 16, "seed": 3},
        "search": {"method": "grid"},
        "repeats": 1,
    }


@dataclass
class Project:
    name: str
    api: httpx.Client
    login: dict | None  # the MLflow login shown when the project was made


@pytest.fixture(scope="module")
def auth_stack(make_database, tmp_path_factory) -> Iterator[Stack]:  # noqa: ANN001
    """A stack of its own whose MLflow server runs the basic-auth app, as docker-compose runs it."""
    home = tmp_path_factory.mktemp("descent-mlflow-auth")
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "deploy" / "mlflow-auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{home}/basic_auth.db"
    with open(home / "mlflow-auth.ini", "w") as out:
        config.write(out)
    password = secrets.token_urlsafe(16)
    with pytest.MonkeyPatch.context() as env:  # the children inherit these; so does this process's MLflow client
        env.setenv("MLFLOW_AUTH_CONFIG_PATH", str(home / "mlflow-auth.ini"))
        env.setenv("MLFLOW_AUTH_ADMIN_USERNAME", MLFLOW_ADMIN)
        env.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
        env.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))
        env.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN)
        env.setenv("MLFLOW_TRACKING_PASSWORD", password)
        settings = stack_settings(make_database, home, "descent_sec_mlflow", bootstrap_key=ADMIN_KEY,
                                  mlflow_auth_enabled=True)
        group = start_stack(settings, home / "logs", workers=1, concurrency=2)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=60,
                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:  # fmt: skip
                yield Stack(settings, group, api, MlflowClient(settings.mlflow_tracking_uri),
                            Celery("sec-producer", broker=settings.broker_url))  # fmt: skip
        finally:
            group.stop_all()
            print("stack logs:", *sorted((home / "logs").glob("*.log")))


def make_project(stack: Stack, prefix: str) -> Project:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    created = stack.api.post("/v1/projects", json={"name": name})
    assert created.status_code == 201, created.text
    minted = stack.api.post(f"/v1/projects/{name}/keys", json={"label": prefix})
    assert minted.status_code == 201, minted.text
    api = httpx.Client(base_url=str(stack.api.base_url), timeout=60,
                       headers={"Authorization": f"Bearer {minted.json()['key']}"})  # fmt: skip
    return Project(name, api, created.json().get("mlflow_login"))


@pytest.fixture(scope="module")
def alpha(auth_stack: Stack) -> Iterator[Project]:
    project = make_project(auth_stack, "alpha")
    yield project
    project.api.close()


@pytest.fixture(scope="module")
def beta(auth_stack: Stack) -> Iterator[Project]:
    project = make_project(auth_stack, "beta")
    yield project
    project.api.close()


@contextlib.contextmanager
def mlflow_as(stack: Stack, login: dict | None) -> Iterator[MlflowClient]:
    """An MLflow client that logs in as a project's user (MLflow's client reads the login from the environment)."""
    assert login is not None, "the project was made without an MLflow login"
    saved = {k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ |= {"MLFLOW_TRACKING_USERNAME": login["username"], "MLFLOW_TRACKING_PASSWORD": login["password"]}
    try:
        yield MlflowClient(stack.settings.mlflow_tracking_uri)
    finally:
        os.environ |= saved


def denied(call) -> None:  # noqa: ANN001
    with pytest.raises(MlflowException) as refused:
        call()
    assert "403" in str(refused.value) or "PERMISSION_DENIED" in str(refused.value), refused.value


def run_study(project: Project, spec: dict, timeout_s: float = 240) -> dict:
    submitted = project.api.post("/v1/studies", json=spec)
    assert submitted.status_code == 201, submitted.text
    deadline = time.monotonic() + timeout_s
    while True:
        study = project.api.get(f"/v1/studies/{submitted.json()['id']}").json()
        if study["status"] in ("succeeded", "failed", "cancelled") and study["registered_model"] is not None:
            return study
        assert time.monotonic() < deadline, f"study still {study['status']} after {timeout_s} s: {study}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def studies(auth_stack: Stack, alpha: Project, beta: Project) -> dict[str, dict]:
    """Both projects run a study `sweep` in an experiment `shared`: beta's first, then alpha's."""
    return {p.name: run_study(p, study_spec("sweep", "shared")) for p in (beta, alpha)}


def test_the_same_names_in_two_projects_are_two_experiments_and_two_models(
    auth_stack: Stack, alpha: Project, beta: Project, studies: dict[str, dict]
) -> None:
    mlflow = auth_stack.mlflow  # the admin's view
    ours, theirs = studies[beta.name], studies[alpha.name]
    assert ours["status"] == theirs["status"] == "succeeded", (ours, theirs)
    # alpha's study ended last: before the fix it registered a new version of `sweep` and moved its @best.
    best = mlflow.get_model_version_by_alias(ours["registered_model"]["name"], "best")
    assert best.run_id == ours["registered_model"]["run_id"], "alpha's study moved beta's @best"
    assert ours["registered_model"]["name"] == f"{beta.name}.sweep"
    assert theirs["registered_model"]["name"] == f"{alpha.name}.sweep"

    assert ours["mlflow"]["experiment_id"] != theirs["mlflow"]["experiment_id"], "both studies share one experiment"
    assert mlflow.get_experiment(ours["mlflow"]["experiment_id"]).name == f"{beta.name}/shared"
    assert mlflow.get_experiment(theirs["mlflow"]["experiment_id"]).name == f"{alpha.name}/shared"

    # a job may not name a path into another project's experiments: a 422 naming the field
    refused = alpha.api.post("/v1/jobs", json={"experiment": f"{beta.name}/shared", "dataset": {"name": "iris"}})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["field"] == "experiment", refused.text


def test_a_projects_mlflow_login_reads_its_own_work_only(
    auth_stack: Stack, alpha: Project, beta: Project, studies: dict[str, dict]
) -> None:
    ours = studies[beta.name]
    experiment_id, parent_run = ours["mlflow"]["experiment_id"], ours["mlflow"]["run_id"]
    model = ours["registered_model"]
    trial_run = model["run_id"]

    with mlflow_as(auth_stack, alpha.login) as intruder:
        denied(lambda: intruder.get_experiment(experiment_id))
        denied(lambda: intruder.get_run(trial_run))
        denied(lambda: intruder.get_metric_history(trial_run, "train_loss"))
        denied(lambda: intruder.create_run(experiment_id))
        denied(lambda: intruder.log_metric(trial_run, "val_accuracy", 0.0))
        denied(lambda: intruder.set_tag(parent_run, "descent.best_config", "mine"))
        denied(lambda: intruder.get_registered_model(model["name"]))
        denied(lambda: intruder.set_registered_model_alias(model["name"], "best", "1"))
        visible = {e.name for e in intruder.search_experiments()}
        assert visible == {f"{alpha.name}/shared"}, visible
        # its own: readable, and the service still writes it
        mine = studies[alpha.name]
        assert intruder.get_run(mine["registered_model"]["run_id"]).info.status == "FINISHED"
        assert intruder.get_model_version_by_alias(mine["registered_model"]["name"], "best").version

    with mlflow_as(auth_stack, beta.login) as owner:
        assert owner.get_model_version_by_alias(model["name"], "best").run_id == trial_run
        assert owner.get_metric_history(trial_run, "train_loss")
    assert auth_stack.mlflow.get_model_version_by_alias(model["name"], "best").run_id == trial_run
    metrics = beta.api.get(f"/v1/jobs/{model['job_id']}/metrics")  # the API still reads MLflow
    assert metrics.status_code == 200 and metrics.json()["train_loss"], metrics.text


def test_names_made_in_mlflow_ahead_of_a_project_do_not_receive_its_work(
    auth_stack: Stack, alpha: Project, beta: Project, studies: dict[str, dict]
) -> None:
    with mlflow_as(auth_stack, alpha.login) as squatter:
        trap = squatter.create_experiment(f"{beta.name}/later")  # MLflow makes alpha its manager
        squatter.create_registered_model(f"{beta.name}.later")

    ours = run_study(beta, study_spec("later", "later"))
    assert ours["status"] == "succeeded", ours
    assert ours["mlflow"]["experiment_id"] != trap
    assert auth_stack.mlflow.get_experiment(ours["mlflow"]["experiment_id"]).name == f"{beta.name}/later"
    model = ours["registered_model"]
    assert model["name"] == f"{beta.name}.later" and model["version"] is not None, model

    with mlflow_as(auth_stack, alpha.login) as squatter:
        # what alpha made is still alpha's, moved aside and empty of beta's runs
        assert squatter.get_experiment(trap).name.startswith("_moved/")
        assert squatter.search_runs([trap]) == []
        denied(lambda: squatter.get_experiment(ours["mlflow"]["experiment_id"]))
        denied(lambda: squatter.get_registered_model(model["name"]))
        denied(lambda: squatter.set_registered_model_alias(model["name"], "best", str(model["version"])))
    with mlflow_as(auth_stack, beta.login) as owner:
        assert owner.get_model_version_by_alias(model["name"], "best").run_id == model["run_id"]
