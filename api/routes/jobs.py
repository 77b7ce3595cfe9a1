"""/v1/jobs: submit, read, list, cancel, metrics. Routes only coordinate."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from api.deps import CallerDep, SessionDep
from api.errors import problem, too_many, unprocessable
from api.responses import ModelResponse
from api.routes.operator import SUBMISSION_SECONDS
from api.schemas import AUTH_RESPONSES, QUOTA_RESPONSES, JobPublic, JobsPublic, MetricPoint, Problem, finite_or_none
from jobs import dataset_store, pools, repository
from jobs.db import reads_only
from jobs.limits import LimitExceeded, QuotaExceeded
from jobs.models import Job
from jobs.queue import enqueue_job
from jobs.settings import settings
from jobs.spec import JobSpec
from jobs.states import JobStatus
from jobs.tracking import read_metric_histories

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTH_RESPONSES)

# Another project's job answers 404 like a job that does not exist: ids do not leak.
NOT_FOUND = {404: {"model": Problem, "description": "No job with this id in the caller's project."}}


def _job_or_404(session: SessionDep, caller: CallerDep, job_id: str) -> Job:
    parsed = repository.parse_uuid(job_id)
    job = repository.get_job(session=session, job_id=parsed, project=caller.project) if parsed else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="Retrying with the same key and spec returns the same job (200) instead of a new one.",
    ),
]


# The body is read as JSON first, then validated as a JobSpec once an uploaded dataset's
# metadata is filled in from the database; the schema it documents is JobSpec's.
SpecBody = Annotated[dict[str, Any], Body(description="A JobSpec (GET /v1/catalog lists the fields).")]
SPEC_BODY_SCHEMA = {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}}}}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "The job an earlier request with this Idempotency-Key created."},
        400: {"model": Problem, "description": "The body could not be read as JSON."},
        409: {"model": Problem, "description": "The Idempotency-Key was used with a different spec."},
        413: {"model": Problem, "description": "The body is larger than MAX_REQUEST_BYTES."},
        **QUOTA_RESPONSES,
    },
    openapi_extra=SPEC_BODY_SCHEMA,
)
def submit_job(
    body: SpecBody, session: SessionDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> Response:
    with SUBMISSION_SECONDS.time():
        try:
            spec = _validated_spec(body, session, caller)
        except dataset_store.UnknownDataset as exc:
            return unprocessable([problem("body", "dataset.id", str(exc), "dataset_unknown")])
        states = pools.pool_states(session=session)
        if unknown := pools.unknown_pool_message(spec.resources.pool, states):
            return unprocessable([problem("body", "resources.pool", unknown, "pool_unknown")])
        waiting = pools.waiting_reason(spec.resources.pool, states)
        return _submit(spec, session, caller, idempotency_key, waiting)


def _validated_spec(body: dict[str, Any], session: SessionDep, caller: CallerDep) -> JobSpec:
    resolved = dataset_store.resolve_uploaded_dataset(session=session, project=caller.project, spec=body)
    try:
        return JobSpec.model_validate(resolved)
    except ValidationError as exc:  # answered like any request validation error
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


def _submit(
    spec: JobSpec, session: SessionDep, caller: CallerDep, idempotency_key: str | None, waiting_reason: str | None = None
) -> Response:
    # The row is committed before the message is sent: a worker never sees an id
    # that is not in the database yet. PostgreSQL is the truth: if the broker is
    # down, the job stays queued and the reaper sends it once the broker is back.
    # The limits are the job gate's (repository.create_job), the same for every job row.
    def create() -> tuple[Job, bool]:
        return repository.create_job(
            session=session, spec=spec, idempotency_key=idempotency_key, project=caller.project,
            submitted_by_key_id=caller.key_id,
        )

    try:
        try:
            job, created = create()
            session.commit()
        except IntegrityError:  # a concurrent request with the same key won the race: answer as a retry
            session.rollback()
            job, created = create()
    except repository.IdempotencyConflict as exc:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except LimitExceeded as exc:
        session.rollback()
        return unprocessable([problem("body", b.field, b.message, "limit_exceeded") for b in exc.breaches])
    except QuotaExceeded as exc:
        session.rollback()
        return too_many(exc)
    if not created:
        return ModelResponse(JobPublic.from_row(job, waiting_reason), status_code=status.HTTP_200_OK)
    try:
        enqueue_job(job.id, job.pool)
    except Exception as exc:  # noqa: BLE001
        log.warning("job %s recorded but not yet enqueued (broker unreachable: %s); the reaper will send it", job.id, exc)
    return ModelResponse(JobPublic.from_row(job, waiting_reason), status_code=status.HTTP_201_CREATED)


@router.get("", response_model=JobsPublic, responses={422: {"description": "Bad status, limit or cursor."}})
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    study_id: Annotated[uuid.UUID | None, Query(description="Only the trials of this study.")] = None,
) -> JobsPublic | JSONResponse:
    try:
        items, next_cursor = repository.list_jobs(
            session=session, project=caller.project, status=status_filter, limit=limit, cursor=cursor,
            study_id=study_id,
        )  # fmt: skip
    except repository.InvalidCursor as exc:
        return unprocessable([problem("query", "cursor", str(exc), "cursor")])
    queued_pools = {j.pool for j in items if j.status == JobStatus.queued}
    states = pools.pool_states(session=session) if queued_pools else {}
    reasons = {pool: pools.waiting_reason(pool, states) for pool in queued_pools}
    return JobsPublic(items=[JobPublic.from_row(j, reasons.get(j.pool)) for j in items], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: str, session: SessionDep, caller: CallerDep) -> Response:
    reads_only(session)
    parsed = repository.parse_uuid(job_id)
    job = repository.read_job_view(session=session, job_id=parsed, project=caller.project) if parsed else None
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    queued = job.status == JobStatus.queued
    waiting = pools.waiting_reason(job.pool, pools.pool_states(session=session)) if queued else None
    # Read: its connection goes back to the pool now, not once the answer has been sent.
    session.close()
    return ModelResponse(JobPublic.from_row(job, waiting))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The job has already ended."}},
)
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobPublic:
    parsed = repository.parse_uuid(job_id)
    outcome = repository.request_cancel(session=session, job_id=parsed, project=caller.project) if parsed else None
    session.commit()
    if outcome is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    if not outcome.accepted:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job {job_id} has already ended ({outcome.status}); only active jobs can be cancelled"
        )
    return JobPublic.from_row(_job_or_404(session, caller, job_id))


@router.get(
    "/{job_id}/metrics",
    response_model=dict[str, list[MetricPoint]],
    responses={
        **NOT_FOUND,
        200: {"description": "One page of every metric's history; a `Link: <...>; rel=\"next\"` header "
                             "names the next page while there is one."},
        422: {"description": "Bad after_step or limit (over METRICS_PAGE_MAX)."},
        503: {"model": Problem, "description": "MLflow is unreachable."},
    },
)  # fmt: skip
def job_metrics(
    job_id: str,
    request: Request,
    response: Response,
    session: SessionDep,
    caller: CallerDep,
    after_step: Annotated[
        int | None, Query(ge=-1, description="Only the points after this step (the previous page's last).")
    ] = None,
    limit: Annotated[
        int | None,
        Query(ge=1, description="Points per page at most (default METRICS_PAGE_DEFAULT, at most METRICS_PAGE_MAX); "
                                "a step is never split."),
    ] = None,
) -> dict[str, list[MetricPoint]] | JSONResponse:
    """Every metric's history, read back from the job's MLflow run ({} before the run exists),
    a page at a time in step order: follow the Link header's `next` until there is none."""
    job = _job_or_404(session, caller, job_id)
    if limit is not None and limit > settings.metrics_page_max:
        return unprocessable([problem("query", "limit", f"at most {settings.metrics_page_max:,} points a page "
                                      "(METRICS_PAGE_MAX)", "limit_exceeded")])  # fmt: skip
    if not job.mlflow_run_id:
        return {}
    try:
        histories = read_metric_histories(job.mlflow_run_id)
    except Exception as exc:  # noqa: BLE001
        log.warning("reading metrics of job %s from MLflow failed: %s", job_id, exc)
        return JSONResponse(
            status_code=503, headers={"Retry-After": "5"}, content={"detail": "MLflow is unreachable; try again shortly"}
        )
    page, last_step = _metrics_page(histories, after_step, limit or settings.metrics_page_default)
    if last_step is not None:
        # Relative (RFC 8288): right behind a proxy that serves the API under another name.
        next_url = request.url.include_query_params(after_step=last_step, limit=limit or settings.metrics_page_default)
        response.headers["Link"] = f'<{next_url.path}?{next_url.query}>; rel="next"'
    return {key: [MetricPoint(step=p["step"], value=finite_or_none(p["value"])) for p in points]
            for key, points in page.items()}  # fmt: skip


def _metrics_page(
    histories: dict[str, list[dict[str, float]]], after_step: int | None, limit: int
) -> tuple[dict[str, list[dict[str, float]]], int | None]:
    """(the points of the steps after `after_step`, whole steps while they fit in `limit`
    points (the first step always), the page's last step when more steps follow, else None)."""
    floor = -1 if after_step is None else after_step
    per_step: dict[int, int] = {}
    for points in histories.values():
        for point in points:
            if point["step"] > floor:
                per_step[point["step"]] = per_step.get(point["step"], 0) + 1
    steps = sorted(per_step)
    taken, last = 0, None
    for step in steps:
        if last is not None and taken + per_step[step] > limit:
            break
        taken, last = taken + per_step[step], step
    if last is None:
        return {}, None
    page = {key: [p for p in points if floor < p["step"] <= last] for key, points in histories.items()}
    return {key: points for key, points in page.items() if points}, (last if last != steps[-1] else None)
