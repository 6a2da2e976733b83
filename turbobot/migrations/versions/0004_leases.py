"""channel leases and the worker registry (several workers on one database)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 08:00:00

A worker processes a channel only while it holds the channel's lease; each step's
transaction checks the lease's generation (fencing). Both tables start empty: a single
process that upgrades takes its channels' leases on its next start.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("channel", sa.String(length=512), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("incarnation", sa.String(length=48), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel", name=op.f("pk_leases")),
    )
    op.create_index(op.f("ix_leases_incarnation"), "leases", ["incarnation"])
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("incarnation", sa.String(length=48), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leases", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index(op.f("ix_leases_incarnation"), table_name="leases")
    op.drop_table("leases")
