"""uploaded datasets, stored normalised in the database

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("label_column", sa.String(length=200), nullable=False, server_default=""),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("shape", JSON_DOCUMENT, nullable=False),
        sa.Column("classes", JSON_DOCUMENT, nullable=False),
        sa.Column("feature_names", JSON_DOCUMENT, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name=op.f("fk_datasets_project_projects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_index(
        "uq_datasets_project_sha256_label_column", "datasets", ["project", "sha256", "label_column"], unique=True
    )
    op.create_index("ix_datasets_project_created_at", "datasets", ["project", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_datasets_project_created_at", table_name="datasets")
    op.drop_index("uq_datasets_project_sha256_label_column", table_name="datasets")
    op.drop_table("datasets")
