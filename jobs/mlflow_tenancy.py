"""MLflow is one server for every project: each project's names in it, and its own login.

Names. A project's experiments are `<project>/<experiment>` and its registered models
`<project>.<study>` (MLflow refuses '/' in a model name; a project name has no '.' and
no '/', so the prefix always says whose a name is). Descent adds the prefix itself and
a job's `experiment` may not contain '/', so no project can name another's.

Squatting. MLflow lets any of its users create an experiment or a registered model of
any name, and makes the creator its manager. So Descent writes only into names it made
itself, recorded in the `mlflow_names` table; a name that MLflow has but the table does
not was made by someone else, and is moved aside (renamed under `_moved`, a prefix no
project can have) before Descent makes its own.

Logins. Where MLflow runs its basic-auth app (MLFLOW_AUTH_ENABLED), each project has an
MLflow user, `project.<name>`, made with the project, that may READ the project's
experiments and registered models and nothing else (deploy/mlflow-auth.ini:
default_permission = NO_PERMISSIONS). Descent itself writes with the admin login
(MLFLOW_TRACKING_USERNAME/PASSWORD, read by MLflow's client). Read-only on purpose: a
user who may edit an experiment or a model may rename it, and a renamed name is one
Descent would later write into or move aside.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow.entities import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import MlflowName, Project, utcnow
from jobs.settings import settings
from jobs.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

if TYPE_CHECKING:
    from mlflow.server.auth.client import AuthServiceClient

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
REGISTERED_MODEL = "registered_model"
PROJECT_PERMISSION = "READ"
MOVED_PREFIX = "_moved"  # project names start with a letter or a digit
USERNAME_PREFIX = "project."  # no project name has a '.': never the admin's name, nor a person's


def experiment_name(project: str, experiment: str) -> str:
    return f"{project}/{experiment}"


def registered_model_name(project: str, study: str) -> str:
    return f"{project}.{study}"


def project_username(project: str) -> str:
    return f"{USERNAME_PREFIX}{project}"


@dataclass(frozen=True)
class MlflowLogin:
    """A project's MLflow user and its password (shown once: MLflow keeps only a hash)."""

    username: str
    password: str


def _auth_client() -> AuthServiceClient:
    # Imported here: it loads MLflow's server (Flask) and Flask-WTF, which only a stack
    # with MLflow's auth app needs.
    from mlflow.server.auth.client import AuthServiceClient

    return AuthServiceClient(settings.mlflow_tracking_uri)


def create_login(project: str) -> MlflowLogin | None:
    """The project's MLflow user with a new password: made, or its password replaced (the
    way to reset a lost one). None where MLflow runs without its auth app."""
    if not settings.mlflow_auth_enabled:
        return None
    client = _auth_client()
    login = MlflowLogin(project_username(project), secrets.token_urlsafe(24))
    try:
        client.create_user(login.username, login.password)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(login.username, login.password)
    return login


def grant_project(project: str, kind: str, resource_id: str) -> None:
    """Let the project's MLflow user read one of its experiments or registered models."""
    if not settings.mlflow_auth_enabled:
        return
    try:
        _auth_client().grant_user_permission(project_username(project), kind, resource_id, PROJECT_PERMISSION)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_ALREADY_EXISTS":  # shared already (mlflow-login grants again)
            return
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        # A project made before its logins existed: Descent still records its runs, and
        # `python -m api.admin mlflow-login <project>` makes the user and grants these.
        log.warning("project %s has no MLflow user: %s %s is not shared with it", project, kind, resource_id)


def grant_recorded(session: Session, project: str) -> int:
    """Grant the project's MLflow user every name Descent made for the project; how many."""
    rows = list(session.scalars(select(MlflowName).where(MlflowName.project == project)))
    for row in rows:
        grant_project(project, row.kind, row.mlflow_id)
    return len(rows)


def project_experiment_id(client: MlflowClient, session: Session, project: str, experiment: str) -> str:
    """The id of the project's experiment, made (and shared with the project's user) the first time."""
    name = experiment_name(project, experiment)
    return _own_name(session, EXPERIMENT, name, project, lambda: _make_experiment(client, name, project))


def project_registered_model(client: MlflowClient, session: Session, project: str, study: str) -> str:
    """The name of the project's registered model for a study, made (and shared) the first time."""
    name = registered_model_name(project, study)
    return _own_name(session, REGISTERED_MODEL, name, project, lambda: _make_registered_model(client, name, project))


def _own_name(session: Session, kind: str, name: str, project: str, make: Callable[[], str]) -> str:
    known = session.get(MlflowName, (kind, name))
    if known is not None:
        return known.mlflow_id
    # One maker per project at a time (the project's row lock, held until the caller
    # commits): a second worker waits here, then finds the first one's row.
    session.execute(select(Project.name).where(Project.name == project).with_for_update())
    known = session.get(MlflowName, (kind, name), populate_existing=True)
    if known is not None:
        return known.mlflow_id
    mlflow_id = make()
    grant_project(project, kind, mlflow_id)
    session.add(MlflowName(kind=kind, name=name, project=project, mlflow_id=mlflow_id, created_at=utcnow()))
    session.flush()
    return mlflow_id


def _make_experiment(client: MlflowClient, name: str, project: str) -> str:
    # The kind: MLflow's UI opens the experiment's model-training view, not its GenAI one.
    tags = {"descent.project": project, EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    try:
        return client.create_experiment(name, tags=tags)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    taken = client.get_experiment_by_name(name)
    if taken is not None:
        moved = f"{MOVED_PREFIX}/{taken.experiment_id}/{name}"
        log.warning("experiment %s (id %s) was not made by Descent: renamed %s", name, taken.experiment_id, moved)
        if taken.lifecycle_stage == LifecycleStage.DELETED:  # MLflow renames active experiments only
            client.restore_experiment(taken.experiment_id)
            client.rename_experiment(taken.experiment_id, moved)
            client.delete_experiment(taken.experiment_id)
        else:
            client.rename_experiment(taken.experiment_id, moved)
    return client.create_experiment(name, tags=tags)


def _make_registered_model(client: MlflowClient, name: str, project: str) -> str:
    tags = {"descent.project": project}
    try:
        client.create_registered_model(name, tags=tags)
        return name
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    moved = f"{MOVED_PREFIX}.{int(time.time())}.{name}"
    log.warning("registered model %s was not made by Descent: renamed %s", name, moved)
    client.rename_registered_model(name, moved)
    client.create_registered_model(name, tags=tags)
    return name
