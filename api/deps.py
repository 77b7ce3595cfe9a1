"""FastAPI dependencies."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs.db import session_factory

log = logging.getLogger(__name__)


def get_session() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        # Runs after the response went out: with the database gone, the rollback on
        # close fails too, and must not turn an answered request into a dropped one.
        try:
            session.close()
        except SQLAlchemyError as exc:
            log.warning("closing a session failed (database unreachable?): %s", type(exc).__name__)


SessionDep = Annotated[Session, Depends(get_session)]
