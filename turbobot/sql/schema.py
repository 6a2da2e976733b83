"""The SQL schema. Alembic migrations in ``migrations/`` must produce exactly this."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = [
    "conversations",
    "errors",
    "inbox",
    "journal",
    "leases",
    "messages",
    "metadata",
    "model_usage",
    "outbox",
    "samples",
    "steps",
    "usage",
    "workers",
]

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT.
AutoId = BigInteger().with_variant(Integer(), "sqlite")

#: a channel key as canonical JSON: [platform, channel, thread, user]
ChannelColumn = String(512)

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("channel", ChannelColumn, nullable=False),
    Column("template_ref", String(256), nullable=False),
    Column("context", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("yields", Integer, nullable=False),
    Column("deadline", Float, nullable=True),
    Column("broken", Boolean, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    #: the channel's platform and the user who began the conversation, for the
    #: operator's page (migration 0005; ``NULL`` in rows written before it)
    Column("platform", String(32), nullable=True),
    Column("user_id", String(128), nullable=True),
    Index(None, "channel", "status"),
    Index(None, "status", "deadline"),
    Index(None, "started_at"),
    Index(None, "platform", "started_at"),
    Index(None, "user_id", "started_at"),
    Index(None, "status", "started_at"),
)

journal = Table(
    "journal",
    metadata,
    Column(
        "conversation_id",
        String(48),
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("value", Text, nullable=False),
    Column("chain", String(32), nullable=False),
    #: an input taken from the inbox: its value is that inbox row's payload, not
    #: stored again (``value`` is then ``null``; see docs/architecture.md, "Storage")
    Column("message_id", String(128), nullable=True),
)

inbox = Table(
    "inbox",
    metadata,
    Column("seq", AutoId, primary_key=True, autoincrement=True),
    Column("channel", ChannelColumn, nullable=False),
    Column("message_id", String(128), nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_at", Float, nullable=False),
    Column("consumed", Boolean, nullable=False),
    UniqueConstraint("channel", "message_id"),
    Index(None, "consumed", "seq"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("conversation_id", String(48), nullable=False),
    Column("channel", ChannelColumn, nullable=False),
    Column("role", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("at", Float, nullable=False),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    #: a user's line that is an inbox message: its text is that message's, not stored
    #: again (``text`` is then empty)
    Column("message_id", String(128), nullable=True),
    #: an assistant's line: the outbox id of the reply that showed it, and whether it
    #: was streamed (migration 0005)
    Column("reply_id", String(48), nullable=True),
    Column("streamed", Boolean, nullable=True),
    Index(None, "channel", "id"),
    Index(None, "conversation_id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", String(48), primary_key=True),
    Column("channel", ChannelColumn, nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sent", Boolean, nullable=False),
    Column("platform_id", String(128), nullable=True),
    Column("sent_at", Float, nullable=True),
    Index(None, "sent", "id"),
)

#: tokens per user per UTC day (the token budgets and /usage; see docs/architecture.md,
#: "Abuse limits"), added to by each step that generated
#: the longest platform name and user id the usage table keys (longer ones are hashed)
PLATFORM_SIZE, USER_ID_SIZE = 32, 128

usage = Table(
    "usage",
    metadata,
    Column("platform", String(PLATFORM_SIZE), primary_key=True),
    Column("user_id", String(USER_ID_SIZE), primary_key=True),
    #: YYYY-MM-DD, UTC
    Column("day", String(10), primary_key=True),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("generations", Integer, nullable=False),
)

#: which worker process a channel is processed by, while several share one PostgreSQL
#: database (docs/architecture.md, "Scale-out"). A row is never deleted: ``generation``
#: only grows, so a (channel, generation) pair names one holding for good, and a step
#: committed with it is refused once the channel was taken since (fencing).
leases = Table(
    "leases",
    metadata,
    Column("channel", ChannelColumn, primary_key=True),
    #: the worker's name (a restarted worker takes its own leases back at once)
    Column("worker", String(128), nullable=False),
    #: that process's run of the worker
    Column("incarnation", String(48), nullable=False),
    Column("generation", BigInteger, nullable=False),
    #: on the database's clock: workers on several machines need not agree on time
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index(None, "incarnation"),
)

#: the workers sharing the database, for ``turbobot status``
workers = Table(
    "workers",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("incarnation", String(48), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    #: renewed with the worker's leases
    Column("seen_at", DateTime(timezone=True), nullable=False),
    Column("leases", Integer, nullable=False),
)

#: one row per step (an input answered, a deadline, a resumed step), for the
#: operator's page and its latency figures (docs/architecture.md, "Operator's view").
#: Times are epoch seconds on the runtime's clock; durations in seconds.
steps = Table(
    "steps",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("conversation_id", String(48), nullable=False),
    Column("channel", ChannelColumn, nullable=False),
    Column("platform", String(PLATFORM_SIZE), nullable=False),
    Column("user_id", String(USER_ID_SIZE), nullable=True),
    #: what began the step: begin, message, timeout, replay, resume
    Column("trigger", String(16), nullable=False),
    #: when it began
    Column("at", Float, nullable=False),
    #: the input's time in the process before the step began (from its arrival)
    Column("waited", Float, nullable=True),
    #: from the input's arrival to the first byte of a reply handed to the adapter
    Column("first_reply", Float, nullable=True),
    #: in model calls, and in all
    Column("llm", Float, nullable=False),
    Column("duration", Float, nullable=False),
    Column("model", String(64), nullable=True),
    Column("prompt_tokens", Integer, nullable=True),
    Column("completion_tokens", Integer, nullable=True),
    Column("generations", Integer, nullable=False),
    Column("replies", Integer, nullable=False),
    #: the kind of error that ended the step abnormally (see the ``errors`` table)
    Column("error", String(32), nullable=True),
    Index(None, "at"),
    Index(None, "conversation_id"),
)

#: tokens and model time per UTC day per model (the operator's usage page; summed as
#: steps are written, so the page reads a few rows, not every step)
model_usage = Table(
    "model_usage",
    metadata,
    Column("day", String(10), primary_key=True),
    #: a model name may be empty (an LLM that names none): "" then, never NULL
    Column("model", String(64), primary_key=True),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("generations", BigInteger, nullable=False),
    Column("llm_seconds", Float, nullable=False),
)

#: errors worth an operator's look: a failed generation, a template that raised, a
#: replay that diverged, a reply the platform refused (kept and sent again) or that
#: cannot be delivered
errors = Table(
    "errors",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("channel", ChannelColumn, nullable=True),
    Column("conversation_id", String(48), nullable=True),
    #: the outbox id of the reply it concerns
    Column("reply_id", String(48), nullable=True),
    #: one line, secrets never (an exception's type and first line)
    Column("detail", String(500), nullable=False),
    Index(None, "at"),
    Index(None, "conversation_id"),
    Index(None, "reply_id"),
)

#: a worker's gauges once a minute: RAM queues, live and evicted conversations
samples = Table(
    "samples",
    metadata,
    Column("id", AutoId, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("worker", String(128), nullable=False),
    Column("live", Integer, nullable=False),
    #: inputs received and not yet handled (this process's RAM queues)
    Column("queued", Integer, nullable=False),
    #: counted since the process started
    Column("evictions", BigInteger, nullable=False),
    Column("replays", BigInteger, nullable=False),
    Index(None, "at"),
)
