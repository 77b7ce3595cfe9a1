"""artifact store: checkpoints and uploaded datasets may live in MLflow's artifact store

A checkpoint over CHECKPOINT_INLINE_MAX_BYTES, and a dataset over DATASET_INLINE_MAX_BYTES,
is an object in MLflow's artifact store: its row keeps the pointer (`object_uri`), the size
and the SHA-256 it must read back with, and no bytes (`data` NULL). Rows written before this
revision keep their bytes and are read as before. Each row holds exactly one of the two.

Revision ID: 0017_artifact_store
Revises: 0016_submitters
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_artifact_store"
down_revision = "0016_submitters"
branch_labels = None
depends_on = None

ONE_OF_THEM = "(data IS NULL) <> (object_uri IS NULL)"


def upgrade() -> None:
    with op.batch_alter_table("job_checkpoints") as batch:
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("object_uri", sa.String(500), nullable=True))
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))
        batch.create_check_constraint(op.f("ck_job_checkpoints_inline_or_stored"), ONE_OF_THEM)
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("object_uri", sa.String(500), nullable=True))
        batch.add_column(sa.Column("object_size_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("object_sha256", sa.String(64), nullable=True))
        batch.create_check_constraint(op.f("ck_datasets_inline_or_stored"), ONE_OF_THEM)


def downgrade() -> None:
    # Rows whose bytes are in the store cannot go back into a NOT NULL column: refuse, naming them.
    bind = op.get_bind()
    for table in ("job_checkpoints", "datasets"):
        stored = bind.execute(sa.text(f"SELECT count(*) FROM {table} WHERE data IS NULL")).scalar_one()
        if stored:
            raise RuntimeError(f"{stored} rows of {table} point to MLflow's artifact store and hold no bytes; "
                               "delete them (or their jobs and datasets) before downgrading")  # fmt: skip
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("ck_datasets_inline_or_stored"), type_="check")
        batch.drop_column("object_sha256")
        batch.drop_column("object_size_bytes")
        batch.drop_column("object_uri")
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
    with op.batch_alter_table("job_checkpoints") as batch:
        batch.drop_constraint(op.f("ck_job_checkpoints_inline_or_stored"), type_="check")
        batch.drop_column("sha256")
        batch.drop_column("size_bytes")
        batch.drop_column("object_uri")
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
