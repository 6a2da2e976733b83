"""token usage per user per day (token budgets, /usage)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 06:00:00

Each step that generated adds the tokens its model calls reported to its user's day.
Usage before this revision was not counted (it can only be estimated from the
transcript's per-reply token columns), so the table starts empty.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage",
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("generations", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("platform", "user_id", "day", name=op.f("pk_usage")),
    )


def downgrade() -> None:
    op.drop_table("usage")
