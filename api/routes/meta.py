"""Catalog and health probes."""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.deps import current_caller
from api.schemas import AUTH_RESPONSES, Catalog, Readiness
from jobs.catalog import build_catalog
from jobs.db import ping_database, pool_exhausted
from jobs.queue import ping_broker

router = APIRouter()


@lru_cache(maxsize=1)
def _catalog() -> Catalog:
    return build_catalog()


@router.get("/v1/catalog", tags=["catalog"], dependencies=[Depends(current_caller)], responses=AUTH_RESPONSES)
def catalog() -> Catalog:
    """Every dataset, model, optimizer, schedule and loss with its fields, defaults and bounds."""
    return _catalog()


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], response_model=Readiness, responses={503: {"model": Readiness}})
def readyz() -> Readiness | JSONResponse:
    """The database and the broker are reachable, and this process has a database
    connection free (with every pooled one checked out, requests would queue: a load
    balancer should send them elsewhere)."""
    checks = {}
    for name, ping in (("database", ping_database), ("broker", ping_broker)):
        if name == "database" and pool_exhausted():
            checks[name] = "busy: every pooled connection is in use"  # and pinging would queue too
            continue
        try:
            ping()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks[name] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return Readiness(**checks)
    return JSONResponse(status_code=503, headers={"Retry-After": "5"}, content=checks)
