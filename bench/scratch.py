"""What the benchmarks that start a real stack share: the machine's PostgreSQL and Redis
(as the integration tests reach them), throwaway databases made and dropped with admin
SQL, free ports for the stack's servers, and the whole stack as `make up` starts it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from jobs.settings import Settings
from launcher.stack import start_stack

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
def bench_stack(name: str, concurrency: int, api_timeout_s: float = 30, **overrides: object) -> Iterator[BenchStack]:
    """A stack of its own (fresh job and MLflow databases, a private queue, free ports, one
    worker with `concurrency` job slots), stopped and its databases dropped at the end."""
    home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
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
