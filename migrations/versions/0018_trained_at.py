"""trained_at: when a job's running attempt finished training

A study's trial that has trained and is writing its results (model, figures, last
metrics) to MLflow no longer holds a place of its study's parallelism: the study's next
trials start meanwhile. A claim clears it; a row from before this revision has none.

Revision ID: 0018_trained_at
Revises: 0017_artifact_store
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_trained_at"
down_revision = "0017_artifact_store"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("trained_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("trained_at")
