"""Migrations apply to an empty PostgreSQL database, match the models, and downgrade cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER, pg_url

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = str(Path(sys.executable).parent / "alembic")


def alembic(database: str, *args: str) -> str:
    env = os.environ | {"DATABASE_URL": pg_url(database)}
    result = subprocess.run([ALEMBIC, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def tables(database: str) -> set[str]:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_upgrade_from_empty_then_downgrade_to_nothing(make_database) -> None:
    database = make_database("descent_migrations")
    assert tables(database) == set()

    alembic(database, "upgrade", "head")
    assert {"jobs", "job_events", "alembic_version"} <= tables(database)
    # The models and the migrations describe the same schema.
    assert "No new upgrade operations detected" in alembic(database, "check")

    alembic(database, "downgrade", "base")
    assert tables(database) == {"alembic_version"}

    alembic(database, "upgrade", "head")  # and back up again, from the downgraded state
    assert {"jobs", "job_events"} <= tables(database)
