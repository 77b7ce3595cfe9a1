"""The security suite: each test reproduces an attack from issue 14 against a real
stack (PostgreSQL, Redis, an `mlflow server`, the API and a Celery worker, started by
launcher.stack exactly as `make up` starts them) and fails without its fix.

The stack and its helpers are tests/integration's; tenants are made here."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.integration.conftest import ADMIN_KEY, Stack, free_port, make_database, pg_url, stack  # noqa: F401


@dataclass
class Tenant:
    """A project of its own and a plain (non-admin) key of it, with a client that sends the key."""

    project: str
    key: str
    api: httpx.Client


def new_tenant(admin: httpx.Client, base_url: str, prefix: str, admin_key: bool = False, timeout: float = 30) -> Tenant:
    """A project of its own made with a server-admin client, and a client holding a key of it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    created = admin.post("/v1/projects", json={"name": name})
    assert created.status_code == 201, created.text
    minted = admin.post(f"/v1/projects/{name}/keys", json={"label": prefix, "admin": admin_key})
    assert minted.status_code == 201, minted.text
    key = minted.json()["key"]
    client = httpx.Client(base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {key}"})
    return Tenant(name, key, client)


@pytest.fixture(scope="session")
def make_tenant(stack: Stack) -> Iterator[Callable[..., Tenant]]:  # noqa: F811
    """Creates a project with the stack's admin key and returns a client holding a plain key of it."""
    clients: list[httpx.Client] = []

    def make(prefix: str = "tenant", admin: bool = False) -> Tenant:
        tenant = new_tenant(stack.api, str(stack.api.base_url), prefix, admin)
        clients.append(tenant.api)
        return tenant

    yield make
    for client in clients:
        client.close()
