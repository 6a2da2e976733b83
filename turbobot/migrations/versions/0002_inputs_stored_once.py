"""inputs stored once: journal and transcript lines may refer to their inbox message

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 03:00:00

An input's text and message were stored three times (the inbox payload, the journal's
input entry, the transcript's user line). New rows refer to the inbox row by its
``message_id`` instead; rows written before keep their own copy and load as before.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("journal", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message_id", sa.String(length=128), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("message_id", sa.String(length=128), nullable=True))


def downgrade() -> None:
    # Rows that refer to the inbox get their own copies back before the columns go.
    bind = op.get_bind()
    journal = sa.table(
        "journal",
        sa.column("conversation_id"),
        sa.column("seq"),
        sa.column("value"),
        sa.column("message_id"),
    )
    messages = sa.table(
        "messages",
        sa.column("id"),
        sa.column("channel"),
        sa.column("text"),
        sa.column("message_id"),
    )
    conversations = sa.table("conversations", sa.column("id"), sa.column("channel"))
    inbox = sa.table("inbox", sa.column("channel"), sa.column("message_id"), sa.column("payload"))
    refs = bind.execute(
        sa.select(journal.c.conversation_id, journal.c.seq, inbox.c.payload)
        .select_from(
            journal.join(conversations, conversations.c.id == journal.c.conversation_id).join(
                inbox,
                sa.and_(
                    inbox.c.channel == conversations.c.channel,
                    inbox.c.message_id == journal.c.message_id,
                ),
            )
        )
        .where(journal.c.message_id.is_not(None))
    ).all()
    for conversation_id, seq, payload in refs:
        incoming = json.loads(payload)
        value = json.dumps({"text": incoming["text"], "incoming": incoming}, separators=(",", ":"))
        bind.execute(
            journal.update()
            .where(journal.c.conversation_id == conversation_id)
            .where(journal.c.seq == seq)
            .values(value=value)
        )
    lines = bind.execute(
        sa.select(messages.c.id, inbox.c.payload)
        .select_from(
            messages.join(
                inbox,
                sa.and_(
                    inbox.c.channel == messages.c.channel,
                    inbox.c.message_id == messages.c.message_id,
                ),
            )
        )
        .where(messages.c.message_id.is_not(None))
    ).all()
    for line_id, payload in lines:
        text = json.loads(payload)["text"]
        bind.execute(messages.update().where(messages.c.id == line_id).values(text=text))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("message_id")
    with op.batch_alter_table("journal", schema=None) as batch_op:
        batch_op.drop_column("message_id")
