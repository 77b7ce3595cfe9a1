"""Admin routes: projects and their API keys. Every one needs an admin key.

Admin keys administer the whole server (that is what the first key is for); the
jobs an admin submits still belong to the admin key's own project.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, HTTPException, Response, status

from api.deps import AdminDep, CallerDep, SessionDep
from api.schemas import (
    ADMIN_RESPONSES,
    BODY_RESPONSES,
    KeyCreate,
    KeyCreated,
    KeyPublic,
    Problem,
    ProjectCreate,
    ProjectLimitsPublic,
    ProjectLimitsUpdate,
    ProjectPublic,
)
from jobs import access, limits
from jobs.settings import settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["admin"], responses=ADMIN_RESPONSES)


@router.post(
    "/projects",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectPublic,
    responses={**BODY_RESPONSES, 409: {"model": Problem, "description": "A project with this name exists."}},
)
def create_project(body: ProjectCreate, session: SessionDep, caller: AdminDep) -> ProjectPublic:
    try:
        project = access.create_project(session=session, name=body.name)
        session.commit()
    except access.ProjectExists as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    log.info("project %s created by key %s", project.name, caller.key_id or "bootstrap")
    return ProjectPublic(name=project.name, created_at=project.created_at)


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
    """What the project may hold at once and what it holds now: an admin reads any project's,
    any other key its own project's (another project answers 404, like one that does not exist)."""
    if not caller.admin and caller.project != name:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"project {name!r} does not exist")
    return _limits_public(session, name)


@router.put(
    "/projects/{name}/limits",
    response_model=ProjectLimitsPublic,
    responses={**BODY_RESPONSES, **LIMITS_RESPONSES},
)
def set_limits(name: str, body: ProjectLimitsUpdate, session: SessionDep, caller: AdminDep) -> ProjectLimitsPublic:
    """Set the project's own limits (null: the server's setting). Admitted work keeps
    running; what is created from now on is held to them. Admin keys only."""
    try:
        limits.set_project_limits(session=session, project=name, max_active_jobs=body.max_active_jobs,
                                  max_study_parallelism=body.max_study_parallelism)  # fmt: skip
    except limits.UnknownProject as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    session.commit()
    log.info("limits of project %s set to %s by key %s", name, body.model_dump(), caller.key_id or "bootstrap")
    return _limits_public(session, name)
