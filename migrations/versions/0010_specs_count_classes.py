"""job and study specs count an uploaded dataset's classes instead of copying their names

Issue 14: every job spec on an upload carried the dataset's class names (two 2 MB names made
each spec 4 MB). The names stay in `datasets.classes`; a spec's dataset now holds `n_classes`.
A data migration only: the schema does not change.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
# Where an uploaded dataset sits in each table's spec.
DATASET_PATHS = {"jobs": ("dataset",), "studies": ("base", "dataset")}


def _dataset(spec: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
    for key in path:
        spec = spec.get(key) if isinstance(spec, dict) else None
    return spec if isinstance(spec, dict) and "id" in spec else None


def _rewrite(table: str, marker: str, change: Any) -> None:
    """Apply `change(dataset)` (True when it changed) to each spec whose text holds `marker`,
    one row at a time: the rows being fixed are the large ones."""
    bind = op.get_bind()
    rows = sa.table(table, sa.column("id", sa.Uuid()), sa.column("spec", JSON_DOCUMENT))
    candidates = sa.select(rows.c.id).where(sa.cast(rows.c.spec, sa.Text).like(f"%{marker}%"))
    for (row_id,) in bind.execute(candidates).all():
        spec = bind.execute(sa.select(rows.c.spec).where(rows.c.id == row_id)).scalar_one()
        dataset = _dataset(spec, DATASET_PATHS[table])
        if dataset is not None and change(dataset):
            bind.execute(rows.update().where(rows.c.id == row_id).values(spec=spec))


def upgrade() -> None:
    def count_classes(dataset: dict[str, Any]) -> bool:
        if not isinstance(dataset.get("classes"), list):
            return False
        dataset["n_classes"] = len(dataset.pop("classes"))
        return True

    for table in DATASET_PATHS:
        _rewrite(table, '"classes"', count_classes)


def downgrade() -> None:
    bind = op.get_bind()
    datasets = sa.table("datasets", sa.column("id", sa.Uuid()), sa.column("classes", JSON_DOCUMENT))

    def name_classes(dataset: dict[str, Any]) -> bool:
        if not isinstance(dataset.get("n_classes"), int):
            return False
        n = dataset.pop("n_classes")
        try:
            stored = bind.execute(sa.select(datasets.c.classes).where(datasets.c.id == uuid.UUID(dataset["id"])))
            names = stored.scalar_one_or_none()
        except ValueError:
            names = None
        dataset["classes"] = names if names is not None else [str(i) for i in range(n)]  # a deleted dataset
        return True

    for table in DATASET_PATHS:
        _rewrite(table, '"n_classes"', name_classes)
