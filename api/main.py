"""The Descent API: `uvicorn api.main:app`. Never imports torch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.errors import database_busy_handler, database_unavailable_handler, http_error_handler, validation_error_handler
from api.routes import datasets, events, jobs, meta, operator, pools, projects, studies
from jobs import study_search
from jobs.settings import settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger(__name__)

OPTUNA_WARM_UP_WAIT_S = 10.0  # a database that does not answer does not hold the API's start longer


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    # The Optuna storage's first build (0.1-0.4 s) is paid at start, not by the first study.
    try:
        await asyncio.wait_for(asyncio.to_thread(study_search.warm_storage), OPTUNA_WARM_UP_WAIT_S)
    except TimeoutError:
        log.warning("Optuna storage still connecting after %.0f s; the API starts anyway", OPTUNA_WARM_UP_WAIT_S)
    yield


app = FastAPI(
    lifespan=lifespan,
    title="Descent",
    version="0.1.0",
    description="Train classifiers with the optimizer and schedule you choose; compare runs in MLflow.",
    max_body_size=settings.max_request_bytes,  # larger bodies: 413 before anything is parsed (uploads: their own)
)
app.add_exception_handler(RequestValidationError, validation_error_handler)
app.add_exception_handler(StarletteHTTPException, http_error_handler)
# The database unreachable: a 503 that says so (the pool reconnects by itself when it returns).
app.add_exception_handler(OperationalError, database_unavailable_handler)
app.add_exception_handler(InterfaceError, database_unavailable_handler)
# Every pooled connection busy for DATABASE_POOL_TIMEOUT_S: a 503 with Retry-After, not a 500.
app.add_exception_handler(PoolTimeoutError, database_busy_handler)
app.include_router(jobs.router)
app.include_router(events.router)
app.include_router(meta.router)
app.include_router(projects.router)
app.include_router(operator.router)
app.include_router(studies.router)
app.include_router(datasets.router)
app.include_router(pools.router)
