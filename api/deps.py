"""FastAPI dependencies: a database session per request, and the caller behind its API key."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import admission
from jobs.access import Caller, authenticate, bootstrap_caller, recently_verified, remember_verified
from jobs.db import closing_sends_nothing, reads_only, session_factory

log = logging.getLogger(__name__)


async def get_session() -> AsyncIterator[Session]:
    """A session for the request, closed once the response went out.

    Async, so that FastAPI does not send it to its thread pool twice (to open it, to close
    it): opening does no I/O (the connection comes at the first query), and neither does
    closing a session whose transaction has ended (a route that committed) or that only
    read in autocommit (jobs.db.reads_only); only a session still in a transaction is
    closed in the thread pool (its connection's rollback is I/O)."""
    session = session_factory()()
    try:
        yield session
    finally:
        if closing_sends_nothing(session):
            _close(session)
        else:
            await run_in_threadpool(_close, session)


def _close(session: Session) -> None:
    # Runs after the response went out: with the database gone, the rollback on
    # close fails too, and must not turn an answered request into a dropped one.
    try:
        session.close()
    except SQLAlchemyError as exc:
        log.warning("closing a session failed (database unreachable?): %s", type(exc).__name__)


SessionDep = Annotated[Session, Depends(get_session)]


# --------------------------------------------------------------------------- API keys

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer dsk_...`.")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def too_many_requests(refused: admission.Refused) -> HTTPException:
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(refused), {"Retry-After": str(refused.retry_after_s)})


async def current_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Caller:
    """The caller behind the request's API key; 401 without a valid one, 429 for an address
    that sent too many invalid ones. The key itself is never logged: only where the request
    came from and what was wrong.

    Async: the address's check in Redis runs on the event loop, and so does the answer for
    the bootstrap key and for a key this process verified a moment ago (see
    jobs.access.recently_verified); only a key to look up goes to the thread pool. It is
    looked up in a session of its own, closed before the route runs: a yield dependency's
    session lives until the response has been sent, which for an event stream is its whole
    life, and auth must not pin a pooled connection that long."""
    where = request.client.host if request.client else "?"
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        log.info("refused %s %s from %s: no API key", request.method, request.url.path, where)
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer <key>'", CHALLENGE
        )
    presented = credentials.credentials
    try:
        revocations = await admission.check_not_blocked(where)
    except admission.Refused as refused:
        raise too_many_requests(refused) from None
    caller = bootstrap_caller(presented) or recently_verified(presented, revocations)
    if caller is None:
        caller = await run_in_threadpool(_look_up_key, presented, revocations)
    if caller is None:
        log.warning("refused %s %s from %s: unknown or revoked API key", request.method, request.url.path, where)
        try:
            await run_in_threadpool(admission.count_failure, where)
        except admission.Refused as refused:
            raise too_many_requests(refused) from None
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the API key is not valid (unknown or revoked)", CHALLENGE)
    return caller


def _look_up_key(presented: str, revocations: str | None) -> Caller | None:
    with session_factory()() as session:
        caller = authenticate(session=reads_only(session), presented=presented)
    if caller is not None:
        remember_verified(presented, caller, revocations)
    return caller


# These two only look at the caller: async, so that they cost no trip to the thread pool.
async def admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    """An admin key: of its own project (the route checks which project it is about), or of the server."""
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs an admin API key")
    return caller


async def server_admin_caller(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    if not caller.server_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs a server-admin API key")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]
AdminDep = Annotated[Caller, Depends(admin_caller)]
ServerAdminDep = Annotated[Caller, Depends(server_admin_caller)]
