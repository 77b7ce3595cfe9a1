"""Device pools: each job's pool (a column, indexed with the status, for the claim) and the
workers' heartbeats

Revision ID: 0013_pools
Revises: 0012
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013_pools"
down_revision = "0012"
branch_labels = None
depends_on = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # Every job written before pools existed belongs to the default pool (its spec has no
    # `resources`, which reads as the default).
    op.add_column("jobs", sa.Column("pool", sa.String(length=32), nullable=False, server_default="default"))
    op.create_index("ix_jobs_pool_status", "jobs", ["pool", "status"])
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("pool", sa.String(length=32), nullable=False),
        sa.Column("devices", JSON_DOCUMENT, nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_pool"), "workers", ["pool"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_pool"), table_name="workers")
    op.drop_table("workers")
    op.drop_index("ix_jobs_pool_status", table_name="jobs")
    op.drop_column("jobs", "pool")
