"""submitters: which API key submitted each job and study

The MLflow run of a job names who submitted it (`mlflow.user`: the key's label and
project), and a study's trials are submitted by the study's key. Nullable: jobs and
studies from before this revision, and those the bootstrap created, name no key.

Revision ID: 0016_submitters
Revises: 0015
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_submitters"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "studies"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("submitted_by_key_id", sa.Uuid(), nullable=True))
            batch.create_foreign_key(f"fk_{table}_submitted_by_key_id", "api_keys", ["submitted_by_key_id"], ["id"])


def downgrade() -> None:
    for table in ("jobs", "studies"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_submitted_by_key_id", type_="foreignkey")
            batch.drop_column("submitted_by_key_id")
