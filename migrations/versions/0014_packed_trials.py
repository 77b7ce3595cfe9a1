"""packed_trials: the pack a study's trial trained in (issue 13)

Revision ID: 0014_packed_trials
Revises: 0013_pools
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_packed_trials"
down_revision = "0013_pools"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("pack_id", sa.Uuid(), nullable=True))
    op.create_index(op.f("ix_jobs_pack_id"), "jobs", ["pack_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_pack_id"), table_name="jobs")
    op.drop_column("jobs", "pack_id")
