"""What the benchmarks that start a real stack share: the machine's PostgreSQL and Redis
(as the integration tests reach them), throwaway databases made and dropped with admin
SQL, free ports for the stack's servers, and the whole stack as `make up` starts it."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import httpx
import psycopg

from jobs.settings import Settings
from launcher.stack import local_mlflow_auth_config, start_stack

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_sql(sql: str) -> None:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


def database_backends(databases: list[str]) -> list[int]:
    """The pids of PostgreSQL's backends serving these databases (their CPU is the stack's too)."""
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres") as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = ANY(%s)", (databases,)).fetchall()
    return [pid for (pid,) in rows]


@dataclass
class BenchStack:
    settings: Settings
    api: httpx.Client  # authenticated with the stack's bootstrap (server-admin) key
    databases: list[str]  # the job database, then MLflow's


@contextmanager
def mlflow_auth_as_compose(home: Path, auth_cache_s: int | None = None) -> Iterator[None]:
    """MLflow's basic-auth app as docker-compose runs it (launcher.stack.local_mlflow_auth_config:
    deploy/mlflow-auth.ini, its users under `home`), the stack logging in as its admin: the
    environment its children inherit, for as long as the stack runs. `auth_cache_s`
    overrides the file's login cache (0: MLflow's default, none)."""
    password = secrets.token_urlsafe(16)
    config = local_mlflow_auth_config(Settings(descent_home=home), auth_cache_s)
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password,
    }  # fmt: skip
    with patch.dict(os.environ, env):
        yield


@contextmanager
def bench_stack(name: str, concurrency: int, api_timeout_s: float = 30, mlflow_auth_cache_s: int | None = None,
                mlflow_auth: bool = False, **overrides: object) -> Iterator[BenchStack]:  # fmt: skip
    """A stack of its own (fresh job and MLflow databases, a private queue, free ports, one
    worker with `concurrency` job slots), stopped and its databases dropped at the end.
    `mlflow_auth`: MLflow runs its basic-auth app as docker-compose runs it
    (`mlflow_auth_as_compose`, with `mlflow_auth_cache_s`)."""
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    if mlflow_auth:
        overrides["mlflow_auth_enabled"] = True
    with mlflow_auth_as_compose(home, mlflow_auth_cache_s) if mlflow_auth else contextlib.nullcontext():
        databases = [f"{name.replace('-', '')}_{uuid.uuid4().hex[:8]}", f"{name.replace('-', '')}_mlflow_{uuid.uuid4().hex[:8]}"]
        for database in databases:
            admin_sql(f'CREATE DATABASE "{database}"')
        key = "bench-" + uuid.uuid4().hex
        url = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/"
        settings = Settings(
            descent_home=home, database_url=url + databases[0], broker_url=REDIS_URL,
            queue_name=f"{name}-{uuid.uuid4().hex[:8]}", mlflow_port=free_port(), api_port=free_port(),
            mlflow_backend_store_uri=url + databases[1], mlflow_artifacts_destination=str(home / "mlartifacts"),
            bootstrap_key=key, **overrides,
        )  # fmt: skip
        group = start_stack(settings, home / "logs", workers=1, concurrency=concurrency)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=api_timeout_s,
                              headers={"Authorization": f"Bearer {key}"}) as api:  # fmt: skip
                yield BenchStack(settings, api, databases)
        finally:
            group.stop_all()
            for database in databases:
                admin_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
