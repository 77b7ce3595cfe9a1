"""jobs whose MLflow run still has to be ended

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("mlflow_run_to_end", sa.Boolean(), nullable=False, server_default=sa.false()))
    # The reaper looks for the few rows with the flag set; a partial index keeps that cheap.
    op.create_index(
        "ix_jobs_mlflow_run_to_end",
        "jobs",
        ["mlflow_run_to_end"],
        postgresql_where=sa.text("mlflow_run_to_end"),
        sqlite_where=sa.text("mlflow_run_to_end"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_mlflow_run_to_end", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("mlflow_run_to_end")
