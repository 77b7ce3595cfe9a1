"""mlflow_names: the experiments and registered models Descent made in MLflow, per project

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mlflow_names",
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("mlflow_id", sa.String(length=300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name=op.f("fk_mlflow_names_project_projects")),
        sa.PrimaryKeyConstraint("kind", "name", name=op.f("pk_mlflow_names")),
    )
    op.create_index(op.f("ix_mlflow_names_project"), "mlflow_names", ["project"])


def downgrade() -> None:
    op.drop_index(op.f("ix_mlflow_names_project"), table_name="mlflow_names")
    op.drop_table("mlflow_names")
