"""projects and API keys; jobs belong to a project

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

DEFAULT_PROJECT = "default"


def upgrade() -> None:
    projects = op.create_table(
        "projects",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_projects")),
    )
    # Jobs submitted before projects existed belong to the default project.
    op.bulk_insert(projects, [{"name": DEFAULT_PROJECT, "created_at": datetime.now(timezone.utc)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["project"], ["projects.name"], name=op.f("fk_api_keys_project_projects")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_sha256", name=op.f("uq_api_keys_key_sha256")),
    )
    op.create_index(op.f("ix_api_keys_project"), "api_keys", ["project"])
    op.drop_index("ix_jobs_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("project", sa.String(length=64), nullable=False, server_default=DEFAULT_PROJECT)
        )
        batch.create_foreign_key(op.f("fk_jobs_project_projects"), "projects", ["project"], ["name"])
    op.create_index("ix_jobs_project_created_at_id", "jobs", ["project", "created_at", "id"])
    op.create_index("uq_jobs_project_idempotency_key", "jobs", ["project", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_jobs_project_idempotency_key", table_name="jobs")
    op.drop_index("ix_jobs_project_created_at_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("fk_jobs_project_projects"), type_="foreignkey")
        batch.drop_column("project")
    op.create_index("ix_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)
    op.drop_index(op.f("ix_api_keys_project"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("projects")
