"""server-admin API keys: an admin key manages its own project only, a server-admin key every project

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing admin keys become admins of their own project only: none is trusted with the
    # whole server by an upgrade (make one with `python -m api.admin create-key --server-admin`).
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("server_admin", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.create_check_constraint(op.f("ck_api_keys_server_admin_is_admin"), "admin OR NOT server_admin")


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_constraint(op.f("ck_api_keys_server_admin_is_admin"), type_="check")
        batch.drop_column("server_admin")
