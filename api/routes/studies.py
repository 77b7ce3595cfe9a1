"""/v1/studies: submit a comparison, follow it, read its leaderboard, cancel it.

A bad study is a 422 before any trial exists: the spec's own rules, then every
configuration the space can produce (ranges at both ends) validated as a job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Header, HTTPException, Query, status
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import ValidationError

from api.deps import CallerDep, SessionDep
from api.errors import describe, problem, too_many, unprocessable
from api.routes.events import (
    KEEPALIVE_S, POLL_WITHOUT_REDIS_S, STREAM_ID, STREAM_RESPONSES, Followed, event_stream_response, follow_stream, sse,
)
from api.schemas import AUTH_RESPONSES, BODY_RESPONSES, QUOTA_RESPONSES, Problem, StudiesPublic, StudyPublic
from jobs import dataset_store, pools, studies
from jobs.access import Caller
from jobs.db import session_factory
from jobs.events import events_enabled, study_stream_key
from jobs.states import STUDY_TERMINAL
from jobs.limits import QuotaExceeded, limit_breaches
from jobs.models import Study
from jobs.repository import parse_uuid
from jobs.settings import settings
from jobs.study_spec import StudySpec, configurations_to_check, describe_values

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=AUTH_RESPONSES)
NOT_FOUND = {404: {"model": Problem, "description": "No study with this id in the caller's project."}}


def _study_or_404(session: SessionDep, caller: CallerDep, study_id: str) -> Study:
    parsed = parse_uuid(study_id)
    study = studies.get_study(session=session, study_id=parsed, project=caller.project) if parsed else None
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    return study


def _public(session: SessionDep, study: Study) -> StudyPublic:
    trials, board = studies.standing(session=session, study=study)
    return StudyPublic.from_row(study, trials, board, studies.packs(session=session, study_id=study.id))


def _problems(spec: StudySpec) -> list[dict]:
    """Why this study cannot run, in the API's 422 items; [] when it can."""
    most = settings.max_study_trials
    if spec.n_jobs > most:
        field = "repeats" if spec.repeats > 1 else "search.max_trials"
        return [problem("body", field, f"the study would run {spec.n_configurations:,} configurations x "
                        f"{spec.repeats} seeds = {spec.n_jobs:,} jobs; this server runs at most "
                        f"{most} per study (MAX_STUDY_TRIALS)", "limit_exceeded")]  # fmt: skip
    # Each configuration built once: validated as a job, then held to the job limits (the
    # check the job gate makes again when each trial is created).
    for values in configurations_to_check(spec, most):
        where = f"with {describe_values(values)}"
        try:
            job = studies.trial_spec(spec, values, spec.seeds[0], 0)
        except ValidationError as exc:
            return [_invalid(spec, describe(error), where) for error in exc.errors()]
        except ValueError as exc:  # a path the base cannot hold (spec_error names it)
            field = (getattr(exc, "context", None) or {}).get("field", "space")
            return [problem("body", field, f"{exc} ({where})", "spec_inconsistent")]
        if breaches := limit_breaches(job, settings):
            return [problem("body", f"base.{b.field}", f"{b.message} ({where})", "limit_exceeded") for b in breaches]
    return []


def _invalid(spec: StudySpec, item: dict, where: str) -> dict:
    """A job-spec error as the study's: the space's path when the error is about one
    (`optimizer` for a bad optimizer.name), else the base's field."""
    paths = [p for p in spec.space if p == item["field"] or p.startswith(item["field"] + ".")]
    field = f"space.{paths[0] if len(paths) == 1 else item['field']}" if paths else f"base.{item['field']}"
    return problem("body", field, f"{item['msg']} ({where})", item["type"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyPublic,
    responses={**BODY_RESPONSES, **QUOTA_RESPONSES},
)
def submit_study(
    spec: StudySpec, session: SessionDep, caller: CallerDep, background: BackgroundTasks
) -> StudyPublic | JSONResponse:
    """A base job spec, a search space over its fields, a search method, seeds, an
    objective and a pruning rule; trials are ordinary jobs that belong to the study.
    Its first trials are created with it; the rest up to its parallelism just after
    this answer (each trial is an Optuna ask: a large study would otherwise take seconds)."""
    try:  # an uploaded dataset in the base: its metadata from the database, as for a job
        base = dataset_store.resolve_uploaded_dataset(session=session, project=caller.project, spec=spec.base)
    except dataset_store.UnknownDataset as exc:
        return unprocessable([problem("body", "base.dataset.id", str(exc), "dataset_unknown")])
    spec = spec.model_copy(update={"base": base})
    if problems := _problems(spec):
        return unprocessable(problems)
    if unknown := pools.unknown_pool_message(spec.pool, pools.pool_states(session=session)):
        field = "resources.pool" if spec.resources is not None else "base.resources.pool"
        return unprocessable([problem("body", field, unknown, "pool_unknown")])
    try:
        study, job_ids = studies.create_study(session=session, spec=spec, project=caller.project,
                                              submitted_by_key_id=caller.key_id)
    except QuotaExceeded as exc:
        session.rollback()
        return too_many(exc)
    session.commit()
    studies.enqueue_trials(study.id, job_ids, spec.pool)  # committed first: a worker never sees an id the database lacks
    background.add_task(_move_on, study.id)
    return _public(session, study)


def _move_on(study_id: uuid.UUID) -> None:
    """After the answer: the trials the study has room for beyond its first (should this
    fail or the process stop, the reaper's next pass does it)."""
    try:
        studies.move_on(study_id)
    except Exception:  # noqa: BLE001 - the study is recorded; the reaper moves it on
        log.exception("study %s: its next trials wait for the reaper", study_id)


@router.get("", response_model=StudiesPublic)
def list_studies(
    session: SessionDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> StudiesPublic:
    """The caller's studies, newest first."""
    rows = studies.list_studies(session=session, project=caller.project, limit=limit)
    return StudiesPublic(items=[_public(session, s) for s in rows])


@router.get("/{study_id}", response_model=StudyPublic, responses=NOT_FOUND)
def get_study(study_id: str, session: SessionDep, caller: CallerDep) -> StudyPublic:
    """Status, trials by status, and the leaderboard so far (final once the study ended)."""
    return _public(session, _study_or_404(session, caller, study_id))


@router.post(
    "/{study_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=StudyPublic,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The study has already ended."}},
)
def cancel_study(study_id: str, session: SessionDep, caller: CallerDep) -> StudyPublic:
    """Cancel the study and every trial still queued or running."""
    study = _study_or_404(session, caller, study_id)
    outcome = studies.cancel_study(session=session, study_id=study.id, project=caller.project)
    session.commit()
    if outcome is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    if not outcome.accepted:
        raise HTTPException(status.HTTP_409_CONFLICT, f"study {study_id} has already ended ({outcome.status})")
    return _public(session, _study_or_404(session, caller, study_id))


# --------------------------------------------------------------------------- live events


def _read_study(caller: Caller, study_id: str) -> StudyPublic | None:
    parsed = parse_uuid(study_id)
    if parsed is None:
        return None
    with session_factory()() as session:
        study = studies.get_study(session=session, study_id=parsed, project=caller.project)
        return _public(session, study) if study is not None else None


def _final_study_state(study: StudyPublic) -> dict[str, Any]:
    return {"status": study.status, "final": True, "trials": study.trials, "leaderboard": study.leaderboard,
            "finished_at": study.finished_at}  # fmt: skip


async def _study_from_database(caller: Caller, study: StudyPublic) -> AsyncIterator[bytes]:
    """No Redis: the study read once a second; a `trials` event whenever the counts changed."""
    yield sse("snapshot", study.model_dump(mode="json"))
    last = study.trials
    polls = 0
    while study.status not in STUDY_TERMINAL:
        await asyncio.sleep(POLL_WITHOUT_REDIS_S)
        polls += 1
        if polls % int(KEEPALIVE_S / POLL_WITHOUT_REDIS_S) == 0:  # also renews the stream's slot
            yield b": keep-alive\n\n"
        current = await run_in_threadpool(_read_study, caller, str(study.id))
        if current is None:
            return
        study = current
        if study.trials != last and study.status not in STUDY_TERMINAL:
            yield sse("trials", {"trials": study.trials})
        last = study.trials
    yield sse("state", _final_study_state(study))


@router.get(
    "/{study_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "snapshot, then trial and state events"},
               **NOT_FOUND, **STREAM_RESPONSES},
)  # fmt: skip
async def study_events(
    study_id: str,
    caller: CallerDep,
    last_event_id: Annotated[
        str,
        Header(alias="Last-Event-ID", max_length=100, description="Resume after this event (its `id:` line)."),
    ] = None,  # type: ignore[assignment]
) -> StreamingResponse:
    """The study's life as Server-Sent Events: a snapshot (as GET shows it), then each of
    its trials' state changes (`trial`, with the job id) and the study's own (`state`);
    closes after the study's final state, which carries the leaderboard."""
    study = await run_in_threadpool(_read_study, caller, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} not found")
    if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
        last_event_id = None
    followed = Followed(study_stream_key(study.id), partial(_read_study, caller, str(study.id)),
                        lambda s: s.status in STUDY_TERMINAL, _final_study_state)  # fmt: skip
    stream = follow_stream(followed, last_event_id) if events_enabled() else _study_from_database(caller, study)
    return await event_stream_response(caller, stream)
