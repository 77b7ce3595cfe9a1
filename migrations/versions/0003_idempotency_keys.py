"""idempotency keys on job submissions

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("spec_sha256", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_jobs_idempotency_key"), "jobs", ["idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_idempotency_key"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spec_sha256")
        batch.drop_column("idempotency_key")
