"""The real stack for integration tests: fresh PostgreSQL databases, the machine's
Redis with a private queue, an `mlflow server` subprocess with a PostgreSQL store,
the API and real Celery worker processes, all started by launcher.stack exactly as
`make up` starts them.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from celery import Celery
from mlflow.tracking import MlflowClient

from jobs.queue import RUN_JOB_TASK
from jobs.settings import Settings
from launcher.processes import ProcessGroup
from launcher.stack import start_stack

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TERMINAL = {"succeeded", "failed", "cancelled"}
ADMIN_KEY = "it-admin-" + uuid.uuid4().hex  # the stack's DESCENT_BOOTSTRAP_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_url(database: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _admin(sql: str) -> None:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql)


@pytest.fixture(scope="session")
def make_database() -> Iterator:
    """Creates throwaway PostgreSQL databases, dropped at the end of the session."""
    created: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        _admin(f'CREATE DATABASE "{name}"')
        created.append(name)
        return name

    yield make
    for name in created:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class JobCalls:
    """submit and get through the stack's API client, asserting they worked."""

    api: httpx.Client

    def submit(self, spec: dict) -> dict:
        response = self.api.post("/v1/jobs", json=spec)
        assert response.status_code == 201, response.text
        return response.json()

    def get(self, job_id: str) -> dict:
        response = self.api.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()


@dataclass
class Stack(JobCalls):
    settings: Settings
    group: ProcessGroup
    api: httpx.Client
    mlflow: MlflowClient
    producer: Celery

    def wait(self, job_id: str, until: set[str] = TERMINAL, timeout_s: float = 180) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                self.group.check_alive()
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s: {job}")
            time.sleep(0.2)

    def enqueue_raw(self, job_id: str) -> None:
        """Send a run message directly, as a duplicating broker would."""
        self.producer.send_task(RUN_JOB_TASK, args=[job_id], queue=f"{self.settings.queue_name}.{self.settings.worker_pool}")


def stack_settings(make_database, home: Path, name: str, *, mlflow_store: bool = True, **overrides) -> Settings:
    """Settings of a stack of its own: a fresh PostgreSQL database (and one for MLflow's
    store), a private queue on the machine's Redis (also the namespace of its Redis keys),
    free ports; `overrides` on top."""
    fields: dict = {
        "descent_home": home,
        "database_url": pg_url(make_database(name)),
        "broker_url": REDIS_URL,
        "queue_name": f"{name.replace('_', '-')}-{uuid.uuid4().hex[:8]}",
        "mlflow_port": free_port(),
        "api_port": free_port(),
        # One API process: the suites start many stacks on a small machine, and some read the
        # API process itself (its memory); tests/security/test_api_processes.py runs several.
        "api_workers": 1,
    }
    if mlflow_store:
        fields |= {"mlflow_backend_store_uri": pg_url(make_database(f"{name}_mlflow")),
                   "mlflow_artifacts_destination": str(home / "mlartifacts")}  # fmt: skip
    return Settings(**fields | overrides)


@contextmanager
def running_stack(settings: Settings, home: Path, **start: object) -> Iterator[tuple[ProcessGroup, httpx.Client]]:
    """The stack started as `make up` starts it (`start`: start_stack's workers, concurrency,
    pools), with an API client holding the admin key; stopped at the end, its logs named."""
    group = start_stack(settings, Path(home) / "logs", **start)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:  # fmt: skip
            yield group, api
    finally:
        group.stop_all()
        print("integration stack logs:", *sorted((Path(home) / "logs").glob("*.log")))


@pytest.fixture(scope="session")
def stack(make_database, tmp_path_factory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("descent-home")
    settings = stack_settings(
        make_database, home, "descent_it",
        # Short leases and frequent recovery passes, so a killed worker is noticed in seconds.
        lease_s=3.0,
        reaper_interval_s=1.0,
        unclaimed_requeue_s=5.0,
        checkpoint_min_interval_s=0.0,
        bootstrap_key=ADMIN_KEY,
        # The worker's Prometheus /metrics, and system metrics sampled often enough for short jobs.
        worker_metrics_port=free_port(),
        system_metrics_interval_s=1.0,
    )
    # Two job slots, so a long job being cancelled does not hold up the others.
    with running_stack(settings, home, workers=1, concurrency=2) as (group, api):
        producer = Celery("it-producer", broker=settings.broker_url)
        yield Stack(settings, group, api, MlflowClient(settings.mlflow_tracking_uri), producer)
