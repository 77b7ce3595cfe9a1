"""per-project limits: jobs queued or running, running studies' parallelism

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the server's setting applies (MAX_ACTIVE_JOBS_PER_PROJECT, MAX_STUDY_PARALLELISM_PER_PROJECT).
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("max_active_jobs", sa.Integer()))
        batch.add_column(sa.Column("max_study_parallelism", sa.Integer()))


def downgrade() -> None:
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("max_study_parallelism")
        batch.drop_column("max_active_jobs")
