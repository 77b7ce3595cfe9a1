"""Admin routes: projects and their API keys. Every one needs an admin key.

Admin keys administer the whole server (that is what the first key is for); the
jobs an admin submits still belong to the admin key's own project.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, HTTPException, Response, status
from mlflow.exceptions import MlflowException

from api.deps import AdminDep, SessionDep
from api.schemas import ADMIN_RESPONSES, BODY_RESPONSES, KeyCreate, KeyCreated, KeyPublic, MlflowLoginPublic, Problem, ProjectCreate, ProjectCreated
from jobs import access, mlflow_tenancy

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["admin"], responses=ADMIN_RESPONSES)


@router.post(
    "/projects",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectCreated,
    responses={
        **BODY_RESPONSES,
        409: {"model": Problem, "description": "A project with this name exists."},
        503: {"model": Problem, "description": "MLflow is unreachable (its auth app makes the project's login)."},
    },
)
def create_project(body: ProjectCreate, session: SessionDep, caller: AdminDep) -> ProjectCreated:
    """A new project and, where MLflow runs its auth app, its MLflow login (shown this once)."""
    try:
        project = access.create_project(session=session, name=body.name)
        # Before the commit: without its MLflow login, the project is not made either.
        login = mlflow_tenancy.create_login(project.name)
        session.commit()
    except access.ProjectExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except MlflowException as exc:
        log.warning("project %s not created: its MLflow login could not be made: %s", body.name, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "MLflow is unreachable; try again shortly",
                            headers={"Retry-After": "5"}) from exc  # fmt: skip
    log.info("project %s created by key %s", project.name, caller.key_id or "bootstrap")
    return ProjectCreated(name=project.name, created_at=project.created_at,
                          mlflow_login=MlflowLoginPublic(**vars(login)) if login else None)  # fmt: skip


@router.post(
    "/projects/{name}/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses={**BODY_RESPONSES, 404: {"model": Problem, "description": "No project with this name."}},
)
def create_key(name: str, session: SessionDep, caller: AdminDep, body: KeyCreate | None = None) -> KeyCreated:
    """A new key of the project. The key is in this response only: store it now."""
    body = body or KeyCreate()
    try:
        row, key = access.create_key(session=session, project=name, admin=body.admin, label=body.label)
        session.commit()
    except access.UnknownProject as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    log.info("key %s (%s) of project %s created by key %s", row.id, row.prefix, name, caller.key_id or "bootstrap")
    return KeyCreated(**KeyPublic.from_row(row).model_dump(), key=key)


@router.get(
    "/projects/{name}/keys",
    response_model=list[KeyPublic],
    responses={404: {"model": Problem, "description": "No project with this name."}},
)
def list_keys(name: str, session: SessionDep, _caller: AdminDep) -> list[KeyPublic]:
    if not access.project_exists(session=session, name=name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"project {name!r} does not exist")
    return [KeyPublic.from_row(row) for row in access.list_keys(session=session, project=name)]


@router.delete(
    "/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"model": Problem, "description": "No key with this id."}},
)
def revoke_key(key_id: str, session: SessionDep, caller: AdminDep) -> Response:
    """Revoke a key: requests with it are refused from now on. Revoking twice is harmless."""
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        parsed = None
    row = access.revoke_key(session=session, key_id=parsed) if parsed else None
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id} not found")
    session.commit()
    log.info("key %s of project %s revoked by key %s", row.id, row.project, caller.key_id or "bootstrap")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
