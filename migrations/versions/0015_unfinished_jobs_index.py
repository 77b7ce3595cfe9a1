"""apiscale: an index of each project's unfinished jobs, for the job quota's count

Every submission counts its project's queued and running jobs while it holds the
project's quota lock. Without this index that count read every job the project ever
had (a sequential scan: 15 ms with 60,000 finished jobs, so one project could submit
no more than about 60 jobs a second, fewer as its history grew); with it, only the
unfinished ones (0.1 ms for 300).

Revision ID: 0015
Revises: 0014_packed_trials
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014_packed_trials"
branch_labels = None
depends_on = None

# jobs/states.py's TERMINAL as it is at this revision: a migration does not import the model.
FINISHED = "status NOT IN ('succeeded', 'failed', 'cancelled', 'pruned')"


def upgrade() -> None:
    op.create_index(
        "ix_jobs_project_unfinished", "jobs", ["project"],
        postgresql_where=sa.text(FINISHED), sqlite_where=sa.text(FINISHED),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_jobs_project_unfinished", table_name="jobs")
