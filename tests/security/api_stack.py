"""A stack of its own for attacks that need other settings than the shared one, or that
would disturb it (blocking the test's address, exhausting a pool): a fresh PostgreSQL
database, the machine's Redis under a private namespace, the API and the reaper, started
by launcher.stack as `make up` starts them; no MLflow server and no worker, so jobs
stay queued and their event streams stay open."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from jobs.settings import Settings
from launcher.processes import ProcessGroup
from launcher.stack import start_stack
from tests.integration.conftest import stack_settings
from tests.security.conftest import Tenant, new_tenant

SMALL_JOB = {"dataset": {"name": "iris"}, "epochs": 1}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class ApiStack:
    settings: Settings
    group: ProcessGroup
    admin: httpx.Client  # the bootstrap (server-admin) key
    base_url: str
    clients: list[httpx.Client]

    def tenant(self, prefix: str = "tenant", admin: bool = False) -> Tenant:
        tenant = new_tenant(self.admin, self.base_url, prefix, admin, timeout=60)
        self.clients.append(tenant.api)
        return tenant


@contextmanager
def api_stack(make_database: Callable[[str], str], home: Path, **overrides: Any) -> Iterator[ApiStack]:
    bootstrap = "sec-admin-" + uuid.uuid4().hex
    settings = stack_settings(make_database, home, "descent_sec", mlflow_store=False, bootstrap_key=bootstrap,
                              **overrides)
    group = start_stack(settings, home / "logs", workers=0, start_mlflow=False)
    base_url = f"http://127.0.0.1:{settings.api_port}"
    admin = httpx.Client(base_url=base_url, timeout=60, headers=bearer(bootstrap))
    stack = ApiStack(settings, group, admin, base_url, [admin])
    try:
        yield stack
    finally:
        for client in stack.clients:
            client.close()
        group.stop_all()
