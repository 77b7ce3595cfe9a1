"""Admin routes: projects and their API keys. Every one needs an admin key.

A project admin (an admin key) manages its own project's keys; a server admin (the
bootstrap key, keys made with `api.admin create-key --server-admin` or by another server
admin) creates projects and manages every project's keys. Another project's keys are a
403 to a project admin, a key id of another project a 404 (as if it did not exist). The
jobs an admin submits still belong to the admin key's own project.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, HTTPException, Response, status
from mlflow.exceptions import MlflowException

from api.deps import AdminDep, CallerDep, ServerAdminDep, SessionDep
from api.schemas import (
    ADMIN_RESPONSES,
    BODY_RESPONSES,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    MlflowLoginPublic,
    Problem,
    ProjectCreate,
    ProjectCreated,
    ProjectLimitsPublic,
    ProjectLimitsUpdate,
)
from jobs import access, limits, mlflow_tenancy
from jobs.access import Caller
from jobs.settings import settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["admin"], responses=ADMIN_RESPONSES)


def _administered(caller: Caller, project: str) -> None:
    """403 unless the caller administers this project (its own, or any for a server admin)."""
    if not caller.administers(project):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"an admin key of project {caller.project!r} manages that project's keys only; "
            f"project {project!r} needs a server-admin API key",
        )


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
def create_project(body: ProjectCreate, session: SessionDep, caller: ServerAdminDep) -> ProjectCreated:
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
    _administered(caller, name)
    if body.server_admin and not caller.server_admin:  # no key grants more than its own rights
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only a server-admin API key may make a server-admin key")
    try:
        row, key = access.create_key(
            session=session, project=name, admin=body.admin, server_admin=body.server_admin, label=body.label
        )
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
def list_keys(name: str, session: SessionDep, caller: AdminDep) -> list[KeyPublic]:
    _administered(caller, name)
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
    row = access.get_key(session=session, key_id=parsed) if parsed else None
    if row is None or not caller.administers(row.project):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"key {key_id} not found")
    if row.server_admin and not caller.server_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "only a server-admin API key may revoke a server-admin key")
    access.revoke_key(session=session, key_id=row.id)
    session.commit()
    log.info("key %s of project %s revoked by key %s", row.id, row.project, caller.key_id or "bootstrap")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --------------------------------------------------------------------------- quotas (jobs/limits.py)

LIMITS_RESPONSES = {404: {"model": Problem, "description": "No project with this name (or not the caller's)."}}


def _limits_public(session: SessionDep, name: str) -> ProjectLimitsPublic:
    usage = limits.project_usage(session=session, project=name, limits=settings)
    if usage is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"project {name!r} does not exist")
    own = usage.limits
    return ProjectLimitsPublic(
        project=name, max_active_jobs=own.max_active_jobs, max_study_parallelism=own.max_study_parallelism,
        source={"max_active_jobs": "project" if own.active_jobs_overridden else "server",
                "max_study_parallelism": "project" if own.study_parallelism_overridden else "server"},
        active_jobs=usage.active_jobs, study_parallelism=usage.study_parallelism,
    )  # fmt: skip


@router.get("/projects/{name}/limits", response_model=ProjectLimitsPublic, responses=LIMITS_RESPONSES)
def get_limits(name: str, session: SessionDep, caller: CallerDep) -> ProjectLimitsPublic:
    """What the project may hold at once and what it holds now: a server admin reads any
    project's, any other key its own project's (another project answers 404, like one that
    does not exist)."""
    if not caller.server_admin and caller.project != name:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"project {name!r} does not exist")
    return _limits_public(session, name)


@router.put(
    "/projects/{name}/limits",
    response_model=ProjectLimitsPublic,
    responses={**BODY_RESPONSES, **LIMITS_RESPONSES},
)
def set_limits(name: str, body: ProjectLimitsUpdate, session: SessionDep, caller: ServerAdminDep) -> ProjectLimitsPublic:
    """Set the project's own limits (null: the server's setting). Admitted work keeps
    running; what is created from now on is held to them. Server-admin keys only."""
    try:
        limits.set_project_limits(session=session, project=name, max_active_jobs=body.max_active_jobs,
                                  max_study_parallelism=body.max_study_parallelism)  # fmt: skip
    except access.UnknownProject as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    session.commit()
    log.info("limits of project %s set to %s by key %s", name, body.model_dump(), caller.key_id or "bootstrap")
    return _limits_public(session, name)
