"""studies, and the trial columns of jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("project", sa.String(64), sa.ForeignKey("projects.name", name="fk_studies_project_projects"),
                  nullable=False),  # fmt: skip
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("spec", JSON_DOCUMENT, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("configs_created", sa.Integer(), nullable=False),
        sa.Column("mlflow_experiment_id", sa.String(64)),
        sa.Column("mlflow_run_id", sa.String(64)),
        sa.Column("report_pending", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("result", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
    )
    op.create_index("ix_studies_project", "studies", ["project"])
    op.create_index("ix_studies_status", "studies", ["status"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("study_id", sa.Uuid()))
        batch.add_column(sa.Column("config_id", sa.String(16)))
        batch.add_column(sa.Column("trial_number", sa.Integer()))
        batch.add_column(sa.Column("objective_curve", JSON_DOCUMENT, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("trial_told", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_foreign_key("fk_jobs_study_id_studies", "studies", ["study_id"], ["id"])
        batch.create_index("ix_jobs_study_id", ["study_id"])
    # Optuna keeps its own tables (it names one of them `studies` too): on PostgreSQL in a
    # schema of their own, on SQLite in a file of their own (jobs/settings.py).
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SCHEMA IF NOT EXISTS optuna")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_study_id")
        batch.drop_constraint("fk_jobs_study_id_studies", type_="foreignkey")
        for column in ("trial_told", "objective_curve", "trial_number", "config_id", "study_id"):
            batch.drop_column(column)
    op.drop_index("ix_studies_status", table_name="studies")
    op.drop_index("ix_studies_project", table_name="studies")
    op.drop_table("studies")
