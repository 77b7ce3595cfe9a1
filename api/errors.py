"""Error bodies people can act on: every 422 names the field and the reason."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from jobs.limits import QuotaExceeded
from jobs.spec import TAGGED_FIELDS, UPLOADED
from jobs.study_spec import SEARCHES

# Fields holding a discriminated union, and the members' names (which pydantic puts in
# an error's location, but are not fields people wrote).
UNION_MEMBERS: dict[str, set[str]] = {field: set(members) for field, (_, members) in TAGGED_FIELDS.items()}
UNION_MEMBERS["dataset"].add(UPLOADED)  # an uploaded dataset's tag
UNION_MEMBERS["search"] = set(SEARCHES)

log = logging.getLogger(__name__)

LOCATION_ROOTS = {"body", "query", "path", "header"}
DATASET_TAG_MESSAGE = (
    "unknown dataset '{tag}'; a dataset needs a 'name', one of the valid names: {names} (see GET /v1/catalog), "
    "or the 'id' of an uploaded dataset (see GET /v1/datasets)"
)


def field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'optimizer', 'adam', 'lr') -> 'optimizer.lr' (the union tag is not a field)."""
    parts = [p for p in loc if p not in LOCATION_ROOTS] if loc and loc[0] in LOCATION_ROOTS else list(loc)
    cleaned: list[str] = []
    for i, part in enumerate(parts):
        previous = parts[i - 1] if i else None
        if previous in UNION_MEMBERS and part in UNION_MEMBERS[previous]:
            continue
        cleaned.append(str(part))
    return ".".join(cleaned)


def describe(error: dict[str, Any]) -> dict[str, Any]:
    ctx = error.get("ctx") or {}
    field = ctx.get("field") if isinstance(ctx.get("field"), str) else field_path(tuple(error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    if field == "dataset" and error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # Tagged by a function (name or id): say what to send rather than the function's name.
        names = ", ".join(map(repr, TAGGED_FIELDS["dataset"][1]))
        message = DATASET_TAG_MESSAGE.format(tag=ctx.get("tag"), names=names)
        if error["type"] == "union_tag_not_found":
            message = message.split("; ", 1)[1]
    elif error["type"] == "union_tag_invalid":
        message = f"unknown {field or 'value'} '{ctx.get('tag')}'; valid names: {ctx.get('expected_tags')}"
    elif error["type"] == "union_tag_not_found":
        message = f"{field} needs {ctx.get('discriminator')}, one of the registered names (see GET /v1/catalog)"
    return {"loc": list(error["loc"]), "field": field or "body", "msg": message, "type": error["type"]}


def unprocessable(details: list[dict[str, Any]]) -> JSONResponse:
    """The one 422 body: each problem's field and reason, and a sentence with all of them."""
    summary = "; ".join(f"{d['field']}: {d['msg']}" for d in details)
    return JSONResponse(status_code=422, content={"detail": details, "message": f"Invalid request: {summary}"})


def problem(where: str, field: str, message: str, kind: str) -> dict[str, Any]:
    """One item of a 422 raised by the API's own rules (not by request validation)."""
    return {"loc": [where, field], "field": field, "msg": message, "type": kind}


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return unprocessable([describe(e) for e in exc.errors()])


async def database_unavailable_handler(_request: Request, exc: Exception) -> JSONResponse:
    log.error("database unreachable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": "the database is unreachable; try again shortly"},
    )


async def database_busy_handler(_request: Request, _exc: Exception) -> JSONResponse:
    log.error("no database connection free within DATABASE_POOL_TIMEOUT_S")
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": "5"},
        content={"detail": "the server is busy (every database connection is in use); try again shortly"},
    )


def _leaf_routes(routes: list) -> Iterator:
    """Every route, looking inside included routers (FastAPI nests them)."""
    for route in routes:
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is not None:
            yield from _leaf_routes(nested)
        else:
            yield route


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's own handling, except that a 405 lists every method the path serves:
    Starlette's lists only those of the first route that matched the path."""
    if exc.status_code == 405:
        allowed: set[str] = set()
        for route in _leaf_routes(request.app.router.routes):
            match, _ = route.matches({**request.scope, "method": "__none__"})
            if match != Match.NONE and getattr(route, "methods", None):
                allowed |= set(route.methods)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, exc)


def too_many(exc: QuotaExceeded) -> JSONResponse:
    """The one 429 body: which limit the project is at, in words, and when to ask again."""
    return JSONResponse(
        status_code=429,
        headers={"Retry-After": str(exc.retry_after_s)},
        content={"detail": str(exc), "limit": exc.setting},
    )
