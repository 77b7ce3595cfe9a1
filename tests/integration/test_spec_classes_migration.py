"""Migration 0010 on PostgreSQL: job and study specs stored with an upload's class names
(before issue 14) count them instead, read as today's JobSpec, and get the names back
from the datasets table on downgrade."""

from __future__ import annotations

import json
import uuid

import psycopg

from jobs.spec import JobSpec
from tests.integration.conftest import PG_HOST, PG_PORT, PG_USER
from tests.integration.test_migrations import alembic


def test_stored_specs_lose_the_class_names_and_keep_their_count(make_database) -> None:
    database = make_database("descent_migration_0010")
    alembic(database, "upgrade", "0008")
    dataset_id, gone_id = uuid.uuid4(), uuid.uuid4()

    def uploaded(dataset: uuid.UUID, names: list[str]) -> dict:
        return {"id": str(dataset), "val_fraction": 0.5, "name": "d", "sha256": "a" * 64, "n_samples": 40,
                "classes": names, "shape": [2]}  # fmt: skip

    specs = {"kept": {"dataset": uploaded(dataset_id, ["a" * 1000, "b"]), "epochs": 1},
             "gone": {"dataset": uploaded(gone_id, ["x", "y", "z"]), "epochs": 1},
             "blobs": {"dataset": {"name": "blobs", "classes": 3}, "epochs": 1}}  # fmt: skip
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database, autocommit=True) as conn:
        conn.execute("INSERT INTO projects (name, created_at) VALUES ('default', now()) ON CONFLICT DO NOTHING")
        conn.execute(
            "INSERT INTO datasets (id, project, name, format, label_column, sha256, size_bytes, n_rows, shape, "
            "classes, created_at, data) VALUES (%s, 'default', 'd', 'csv', 'y', %s, 1, 40, '[2]', %s, now(), '\\x00')",
            (dataset_id, "a" * 64, json.dumps(["a" * 1000, "b"])),
        )
        for name, spec in specs.items():
            conn.execute(
                "INSERT INTO jobs (id, name, status, spec, created_at, attempts, epoch, step, total_steps, "
                "latest_metrics, mlflow_run_to_end, project, trial_told) VALUES "
                "(%s, %s, 'queued', %s, now(), 0, 0, 0, 1, '{}', false, 'default', false)",
                (uuid.uuid4(), name, json.dumps(spec)),
            )

    def stored() -> dict[str, dict]:
        with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database) as conn:
            return {name: spec for name, spec in conn.execute("SELECT name, spec FROM jobs")}

    alembic(database, "upgrade", "head")
    after = stored()
    assert after["kept"]["dataset"]["n_classes"] == 2 and "classes" not in after["kept"]["dataset"]
    assert after["gone"]["dataset"]["n_classes"] == 3
    assert after["blobs"] == specs["blobs"]  # a built-in dataset's `classes` is its own field
    for spec in after.values():
        JobSpec.model_validate(spec)

    alembic(database, "downgrade", "0008")
    before = stored()
    assert before["kept"]["dataset"]["classes"] == ["a" * 1000, "b"]
    assert before["gone"]["dataset"]["classes"] == ["0", "1", "2"]  # its dataset was deleted: names by code
