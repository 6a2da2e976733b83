"""``SQLStore``: the durable store, with group commit.

One writer task per store gathers the steps written by every channel and commits
them together, one transaction every ``batch_window`` seconds (or sooner when
``max_batch`` operations are waiting), then wakes whoever waits on them. A step's
rows are always in one transaction, and transactions follow the order of
:meth:`SQLStore.write` calls. SQLite runs in WAL mode with ``synchronous=FULL`` by
default: a committed step survives a crash of the process and of the machine.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, event, insert, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.exceptions import ConfigurationError
from turbobot.sql.schema import conversations, inbox, journal, messages, outbox
from turbobot.store import (
    FINAL_STATUSES,
    BaseStore,
    ConversationRecord,
    InboxItem,
    OutgoingRecord,
    Recovery,
    StepWrite,
    TranscriptLine,
)
from turbobot.template import JournalEntry

__all__ = ["SQLStore", "channel_column", "parse_channel_column"]

_log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("running", "waiting")


# Encoders built once: ``json.dumps`` with options builds a new encoder on every call.
_encode_key = json.JSONEncoder(ensure_ascii=False).encode
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# Small on purpose: it only needs to cover the channels active in one group commit,
# and every entry costs ~200 bytes for as long as it stays.
@functools.lru_cache(maxsize=1024)
def channel_column(key: ChannelKey) -> str:
    """A channel key as stored: canonical JSON."""
    return _encode_key([key.platform, key.channel, key.thread, key.user])


def parse_channel_column(value: str) -> ChannelKey:
    platform, channel, thread, user = json.loads(value)
    return ChannelKey(platform, channel, thread, user)


@dataclass(slots=True)
class _Batch:
    """Rows of several operations, grouped by statement."""

    #: rows of one ``add_incoming_many`` call and the future of their seqs
    incoming: list[tuple[list[dict[str, Any]], asyncio.Future[list[int | None]]]] = field(
        default_factory=list
    )
    new_conversations: list[dict[str, Any]] = field(default_factory=list)
    conversation_updates: list[dict[str, Any]] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    outgoing: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    consumed: list[dict[str, Any]] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def size(self) -> int:
        return (
            len(self.incoming)
            + len(self.new_conversations)
            + len(self.conversation_updates)
            + len(self.journal)
            + len(self.messages)
            + len(self.outgoing)
            + len(self.sent)
            + len(self.consumed)
        )


def _new_conversation_row(record: ConversationRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "channel": channel_column(record.key),
        "template_ref": record.template_ref,
        "context": _dumps(record.context),
        "status": record.status,
        "yields": record.yields,
        "deadline": record.deadline,
        "broken": record.broken,
        "started_at": record.started_at,
        "ended_at": record.ended_at,
    }


def _conversation_state(record: ConversationRecord) -> dict[str, Any]:
    return {
        "b_id": record.id,
        "b_status": record.status,
        "b_yields": record.yields,
        "b_deadline": record.deadline,
        "b_broken": record.broken,
        "b_ended_at": record.ended_at,
    }


class SQLStore(BaseStore):
    """A :class:`~turbobot.store.BaseStore` in SQL (SQLite via aiosqlite, PostgreSQL via asyncpg).

    Args:
        url: an SQLAlchemy async URL, e.g. ``sqlite+aiosqlite:///turbobot.db`` or
            ``postgresql+asyncpg://user@host/db``.
        batch_window: seconds the writer waits to gather more operations per commit.
            The default, 0, commits at once when idle; operations that arrive while
            a commit is in flight go together into the next one (group commit).
        max_batch: commit at once when this many operations are waiting.
        sqlite_synchronous: SQLite's ``synchronous`` pragma; ``FULL`` (default)
            survives power loss, ``NORMAL`` only a crash of the process.
        upgrade: bring the schema to the newest migration on open (default: only
            for SQLite; PostgreSQL schemas are upgraded with ``turbobot db upgrade``).
    """

    def __init__(
        self,
        url: str,
        *,
        batch_window: float = 0.0,
        max_batch: int = 5000,
        sqlite_synchronous: str = "FULL",
        upgrade: bool | None = None,
    ) -> None:
        self.url = url
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.sqlite_synchronous = sqlite_synchronous.upper()
        self.is_sqlite = url.startswith("sqlite")
        self.upgrade = self.is_sqlite if upgrade is None else upgrade
        self.engine: AsyncEngine | None = None
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        #: a batch has been taken and is being committed
        self._busy = False
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.engine is not None:
            return
        try:
            engine = create_async_engine(self.url)
        except ImportError as exc:
            raise ConfigurationError(
                f"the database driver for {self.url.split(':', 1)[0]} is missing ({exc.name}); "
                "install it, e.g. pip install 'turbobot[postgres]' for PostgreSQL"
            ) from exc
        if self.is_sqlite:
            synchronous = self.sqlite_synchronous

            @event.listens_for(engine.sync_engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={synchronous}")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute("PRAGMA busy_timeout=10000")
                cursor.close()

        from turbobot.sql.migrate import check_schema, upgrade_schema

        try:
            async with engine.begin() as conn:
                await conn.run_sync(upgrade_schema if self.upgrade else check_schema)
        except BaseException:
            await engine.dispose()
            raise
        self.engine = engine
        self._writer = asyncio.create_task(self._write_loop(), name="turbobot:sql-writer")

    async def aclose(self) -> None:
        if self.engine is None:
            return
        if self._writer is not None:
            if self._failure is None:
                await self.flush()
            self._closing = True
            self._wake.set()
            await self._writer
            self._writer = None
        await self.engine.dispose()
        self.engine = None

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise RuntimeError("the SQL store is not open: use `async with SQLStore(url)`")
        return self.engine

    # -- writes ----------------------------------------------------------------------------

    def _check_writer(self) -> None:
        if self._failure is not None:
            raise RuntimeError("the SQL store's writer failed; see the log") from self._failure
        if self._writer is None:
            raise RuntimeError("the SQL store is not open: use `async with SQLStore(url)`")

    def _queued(self) -> None:
        if not self._wake.is_set():
            self._wake.set()

    async def add_incoming(self, message: IncomingMessage) -> int | None:
        return (await self.add_incoming_many((message,)))[0]

    async def add_incoming_many(self, messages: Sequence[IncomingMessage]) -> list[int | None]:
        self._check_writer()
        if not messages:
            return []
        future: asyncio.Future[list[int | None]] = asyncio.get_running_loop().create_future()
        rows = [
            {
                "channel": channel_column(message.key),
                "message_id": message.message_id,
                "payload": _dumps(message.to_dict()),
                "received_at": message.timestamp,
                "consumed": False,
            }
            for message in messages
        ]
        self._batch.incoming.append((rows, future))
        self._queued()
        return await future

    async def write(self, step: StepWrite) -> None:
        # Everything is copied now: the caller goes on changing its objects.
        self._check_writer()
        batch = self._batch
        record = step.record
        if record is not None:
            if step.new_conversation:
                batch.new_conversations.append(_new_conversation_row(record))
            else:
                batch.conversation_updates.append(_conversation_state(record))
            for offset, entry in enumerate(step.journal):
                batch.journal.append(
                    {
                        "conversation_id": record.id,
                        "seq": step.journal_start + offset,
                        "kind": entry.kind,
                        "value": _dumps(entry.value),
                        "chain": entry.chain,
                    }
                )
            channel = channel_column(record.key)
            for line in step.transcript:
                batch.messages.append(
                    {
                        "conversation_id": line.conversation_id,
                        "channel": channel,
                        "role": line.role,
                        "text": line.text,
                        "at": line.at,
                        "prompt_tokens": line.prompt_tokens,
                        "completion_tokens": line.completion_tokens,
                    }
                )
        for outgoing in step.outgoing:
            batch.outgoing.append(
                {
                    "id": outgoing.id,
                    "channel": channel_column(outgoing.key),
                    "text": outgoing.text,
                    "created_at": outgoing.created_at,
                    "sent": False,
                }
            )
        now = time.time()
        for outgoing_id, platform_id in step.sent:
            batch.sent.append(
                {"b_id": outgoing_id, "b_platform_id": platform_id, "b_sent_at": now, "sent": True}
            )
        for key, message_id in step.consumed:
            batch.consumed.append(
                {"b_channel": channel_column(key), "b_message_id": message_id, "consumed": True}
            )
        self._queued()

    async def flush(self) -> None:
        self._check_writer()
        if not self._busy and not self._batch.size() and not self._batch.waiters:
            return  # nothing written that is not committed yet
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.waiters.append(future)
        self._queued()
        await future

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            if self.batch_window and self._batch.size() < self.max_batch and not self._closing:
                await asyncio.sleep(self.batch_window)
            self._wake.clear()
            batch, self._batch = self._batch, _Batch()
            self._busy = True
            if batch.size() or batch.waiters:
                try:
                    inserted = await self._commit_with_retries(batch) if batch.size() else {}
                except Exception as exc:
                    _log.exception("SQL store: a group commit failed; the store stops")
                    self._failure = exc
                    # Fail everyone: this batch and whatever queued up meanwhile.
                    pending, self._batch = self._batch, _Batch()
                    for failed in (batch, pending):
                        for _rows, future in failed.incoming:
                            if not future.done():
                                future.set_exception(exc)
                        for waiter in failed.waiters:
                            if not waiter.done():
                                waiter.set_exception(exc)
                    self._busy = False
                    return
                for rows, future in batch.incoming:
                    if not future.done():
                        future.set_result(
                            [
                                inserted.pop((row["channel"], row["message_id"]), None)
                                for row in rows
                            ]
                        )
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            self._busy = False
            if self._closing and not self._batch.size() and not self._batch.waiters:
                return

    async def _commit_with_retries(self, batch: _Batch) -> dict[tuple[str, str], int]:
        # A failed transaction rolled back whole, so trying it again is safe; transient
        # errors (a locked SQLite file, a dropped PostgreSQL connection) pass.
        for delay in (0.05, 0.25, 1.0):
            try:
                return await self._commit(batch)
            except (OperationalError, InterfaceError) as exc:
                _log.warning("SQL store: group commit failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
        return await self._commit(batch)

    async def _commit(self, batch: _Batch) -> dict[tuple[str, str], int]:
        inserted: dict[tuple[str, str], int] = {}
        prepared = self._prepared
        async with self._engine().begin() as conn:
            if batch.incoming:
                inserted = await self._insert_incoming(
                    conn, [row for rows, _ in batch.incoming for row in rows]
                )
            for name, rows in (
                ("new_conversations", batch.new_conversations),
                ("conversation_updates", batch.conversation_updates),
                ("journal", batch.journal),
                ("messages", batch.messages),
                ("outgoing", batch.outgoing),
                ("sent", batch.sent),
                ("consumed", batch.consumed),
            ):
                if rows:
                    await prepared[name].execute(conn, rows)
        return inserted

    @functools.cached_property
    def _prepared(self) -> dict[str, _Prepared]:
        dialect = self._engine().dialect
        return {
            "new_conversations": _Prepared(_insert_all(conversations), dialect),
            "conversation_updates": _Prepared(_UPDATE_CONVERSATION, dialect),
            "journal": _Prepared(_insert_all(journal), dialect),
            "messages": _Prepared(_insert_all(messages, skip=("id",)), dialect),
            "outgoing": _Prepared(_insert_all(outbox, skip=("platform_id", "sent_at")), dialect),
            "sent": _Prepared(_MARK_SENT, dialect),
            "consumed": _Prepared(_CONSUME, dialect),
        }

    async def _insert_incoming(
        self, conn: AsyncConnection, rows: list[dict[str, Any]]
    ) -> dict[tuple[str, str], int]:
        from sqlalchemy.dialects import postgresql, sqlite

        # Duplicates (a redelivered platform message) are skipped by the unique
        # constraint, within this batch and across the whole history.
        conflict = ["channel", "message_id"]
        statement = (
            sqlite.insert(inbox).on_conflict_do_nothing(index_elements=conflict)
            if self.is_sqlite
            else postgresql.insert(inbox).on_conflict_do_nothing(index_elements=conflict)
        ).returning(inbox.c.seq, inbox.c.channel, inbox.c.message_id)
        result = await conn.execute(statement, rows)
        return {(row.channel, row.message_id): int(row.seq) for row in result}

    # -- reads ------------------------------------------------------------------------------

    async def load_conversation(self, key: ChannelKey) -> ConversationRecord | None:
        await self.flush()  # read what this process wrote
        async with self._engine().connect() as conn:
            row = (
                await conn.execute(
                    select(conversations)
                    .where(conversations.c.channel == channel_column(key))
                    .where(conversations.c.status.in_(ACTIVE_STATUSES))
                    .order_by(conversations.c.started_at.desc(), conversations.c.id.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                return None
            record = _record(row._mapping)
            entries = await conn.execute(
                select(journal.c.kind, journal.c.value, journal.c.chain)
                .where(journal.c.conversation_id == record.id)
                .order_by(journal.c.seq)
            )
            record.journal = [JournalEntry(e.kind, json.loads(e.value), e.chain) for e in entries]
        return record

    async def recovery(self) -> Recovery:
        await self.flush()
        async with self._engine().connect() as conn:
            pending = await conn.execute(
                select(inbox.c.seq, inbox.c.payload)
                .where(inbox.c.consumed.is_(False))
                .order_by(inbox.c.seq)
            )
            items = [
                InboxItem(int(r.seq), IncomingMessage.from_dict(json.loads(r.payload)))
                for r in pending
            ]
            active_rows = await conn.execute(
                select(
                    conversations.c.channel, conversations.c.status, conversations.c.deadline
                ).where(conversations.c.status.in_(ACTIVE_STATUSES))
            )
            active: set[ChannelKey] = set()
            deadlines: list[tuple[ChannelKey, float]] = []
            running: list[ChannelKey] = []
            for r in active_rows:
                key = parse_channel_column(r.channel)
                active.add(key)
                if r.status == "waiting" and r.deadline is not None:
                    deadlines.append((key, float(r.deadline)))
                elif r.status == "running":
                    running.append(key)
            unsent_rows = await conn.execute(
                select(outbox).where(outbox.c.sent.is_(False)).order_by(outbox.c.id)
            )
            unsent = [
                OutgoingRecord(r.id, parse_channel_column(r.channel), r.text, r.created_at)
                for r in unsent_rows
            ]
        return Recovery(items, active, deadlines, unsent, running)

    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        await self.flush()
        query = select(conversations).order_by(conversations.c.id)
        if key is not None:
            query = query.where(conversations.c.channel == channel_column(key))
        async with self._engine().connect() as conn:
            return [_record(row._mapping) for row in await conn.execute(query)]

    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        await self.flush()
        query = (
            select(messages)
            .where(messages.c.channel == channel_column(key))
            .order_by(messages.c.id)
        )
        async with self._engine().connect() as conn:
            return [
                TranscriptLine(
                    r.conversation_id, r.role, r.text, r.at, r.prompt_tokens, r.completion_tokens
                )
                for r in await conn.execute(query)
            ]


class _Prepared:
    """A statement compiled once for the engine's dialect, run with plain tuples.

    Group commits run thousands of rows per second through a few statements;
    handing the driver positional tuples skips SQLAlchemy's per-row parameter
    processing, which otherwise costs more than the database itself.
    """

    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.order = tuple(compiled.positiontup or ())
        if not self.order:
            raise ValueError("only positional paramstyles are supported")

    async def execute(self, conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
        order = self.order
        await conn.exec_driver_sql(self.sql, [tuple(row[k] for k in order) for row in rows])


def _insert_all(table: Table, *, skip: Sequence[str] = ()) -> Any:
    return insert(table).values({c.name: bindparam(c.name) for c in table.c if c.name not in skip})


def _record(row: Any) -> ConversationRecord:
    status = row["status"]
    assert status in FINAL_STATUSES or status in ACTIVE_STATUSES
    return ConversationRecord(
        id=row["id"],
        key=parse_channel_column(row["channel"]),
        template_ref=row["template_ref"],
        context=json.loads(row["context"]),
        status=status,
        yields=row["yields"],
        deadline=row["deadline"],
        broken=bool(row["broken"]),
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )


_UPDATE_CONVERSATION = (
    update(conversations)
    .where(conversations.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        yields=bindparam("b_yields"),
        deadline=bindparam("b_deadline"),
        broken=bindparam("b_broken"),
        ended_at=bindparam("b_ended_at"),
    )
)
_MARK_SENT = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(sent=True, platform_id=bindparam("b_platform_id"), sent_at=bindparam("b_sent_at"))
)
_CONSUME = (
    update(inbox)
    .where(inbox.c.channel == bindparam("b_channel"))
    .where(inbox.c.message_id == bindparam("b_message_id"))
    .values(consumed=True)
)
