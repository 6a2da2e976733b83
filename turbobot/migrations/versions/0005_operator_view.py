"""what the operator's page shows: steps with timings, tokens per model, errors, gauges

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 11:00:00

Conversations get their platform and the user who began them (filled in for the rows
already there: the platform from the channel key, the user from the stored context),
with indexes for the page's newest-first lists; transcript lines get the outbox id
of the reply that showed them and whether it was streamed. Steps, errors and samples
start empty: timings were not recorded before.
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: conversations filled in per round trip
_PAGE = 2000


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("platform", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("user_id", sa.String(length=128), nullable=True))
    _fill_conversations()
    for columns in (["started_at"], ["platform", "started_at"], ["user_id", "started_at"]):
        name = "ix_conversations_" + "_".join(columns)
        op.create_index(op.f(name), "conversations", columns)
    op.create_index(
        op.f("ix_conversations_status_started_at"), "conversations", ["status", "started_at"]
    )
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("reply_id", sa.String(length=48), nullable=True))
        batch.add_column(sa.Column("streamed", sa.Boolean(), nullable=True))
    op.create_table(
        "steps",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("conversation_id", sa.String(length=48), nullable=False),
        sa.Column("channel", sa.String(length=512), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("waited", sa.Float(), nullable=True),
        sa.Column("first_reply", sa.Float(), nullable=True),
        sa.Column("llm", sa.Float(), nullable=False),
        sa.Column("duration", sa.Float(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("generations", sa.Integer(), nullable=False),
        sa.Column("replies", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steps")),
    )
    op.create_index(op.f("ix_steps_at"), "steps", ["at"])
    op.create_index(op.f("ix_steps_conversation_id"), "steps", ["conversation_id"])
    op.create_table(
        "model_usage",
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("generations", sa.BigInteger(), nullable=False),
        sa.Column("llm_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model", name=op.f("pk_model_usage")),
    )
    op.create_table(
        "errors",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("channel", sa.String(length=512), nullable=True),
        sa.Column("conversation_id", sa.String(length=48), nullable=True),
        sa.Column("reply_id", sa.String(length=48), nullable=True),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_errors")),
    )
    op.create_index(op.f("ix_errors_at"), "errors", ["at"])
    op.create_index(op.f("ix_errors_conversation_id"), "errors", ["conversation_id"])
    op.create_index(op.f("ix_errors_reply_id"), "errors", ["reply_id"])
    op.create_table(
        "samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("live", sa.Integer(), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("evictions", sa.BigInteger(), nullable=False),
        sa.Column("replays", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
    )
    op.create_index(op.f("ix_samples_at"), "samples", ["at"])


def _fill_conversations() -> None:
    """Platform and user of the rows already there, a page at a time (by id)."""
    conn = op.get_bind()
    table = sa.table(
        "conversations",
        sa.column("id", sa.String),
        sa.column("channel", sa.String),
        sa.column("context", sa.Text),
        sa.column("platform", sa.String),
        sa.column("user_id", sa.String),
    )
    after = ""
    while True:
        rows = conn.execute(
            sa.select(table.c.id, table.c.channel, table.c.context)
            .where(table.c.id > after)
            .order_by(table.c.id)
            .limit(_PAGE)
        ).all()
        if not rows:
            return
        updates = [
            {"b_id": row.id, "b_platform": platform, "b_user": user}
            for row in rows
            for platform, user in [_platform_and_user(row.channel, row.context)]
        ]
        conn.execute(
            table.update()
            .where(table.c.id == sa.bindparam("b_id"))
            .values(platform=sa.bindparam("b_platform"), user_id=sa.bindparam("b_user")),
            updates,
        )
        after = rows[-1].id


def _platform_and_user(channel: str, context: str) -> tuple[str | None, str | None]:
    try:
        platform = json.loads(channel)[0]
    except (ValueError, IndexError, TypeError):
        platform = None
    try:
        user = json.loads(context).get("author_id") or None
    except (ValueError, AttributeError):
        user = None
    platform = _key(platform, 32) if isinstance(platform, str) else None
    user = _key(user, 128) if isinstance(user, str) else None
    return platform, user


def _key(text: str, size: int) -> str:
    """An id as the running bot writes it (``turbobot.sql.store._usage_key`` as of this
    revision, frozen here): at most ``size`` characters, a longer one as its hash."""
    text = (
        text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").replace("\0", "\ufffd")
    )
    if len(text) <= size:
        return text
    return "#" + hashlib.sha256(text.encode()).hexdigest()[: size - 1]


def downgrade() -> None:
    op.drop_index(op.f("ix_samples_at"), table_name="samples")
    op.drop_table("samples")
    op.drop_table("model_usage")
    op.drop_index(op.f("ix_errors_reply_id"), table_name="errors")
    op.drop_index(op.f("ix_errors_conversation_id"), table_name="errors")
    op.drop_index(op.f("ix_errors_at"), table_name="errors")
    op.drop_table("errors")
    op.drop_index(op.f("ix_steps_conversation_id"), table_name="steps")
    op.drop_index(op.f("ix_steps_at"), table_name="steps")
    op.drop_table("steps")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("streamed")
        batch.drop_column("reply_id")
    for name in ("status_started_at", "user_id_started_at", "platform_started_at", "started_at"):
        op.drop_index(op.f(f"ix_conversations_{name}"), table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("user_id")
        batch.drop_column("platform")
