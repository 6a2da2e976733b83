"""``SQLStore``: the durable store, with group commit.

One writer task per store gathers the steps written by every channel and commits
them together, one transaction every ``batch_window`` seconds (or sooner when
``max_batch`` operations are waiting), then wakes whoever waits on them. A step's
rows are always in one transaction, and transactions follow the order of
:meth:`SQLStore.write` calls. SQLite runs in WAL mode with ``synchronous=FULL`` by
default: a committed step survives a crash of the process and of the machine.

On a SQLite file the writer uses a connection of its own, outside aiosqlite (see
``_commit_sqlite``); reads, and PostgreSQL, go through SQLAlchemy's async engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_string
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    and_,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.codec import count, to_json, unwritable, writable_text
from turbobot.exceptions import ConfigurationError
from turbobot.journal import JournalEntry
from turbobot.sql.leases import SQLLeases
from turbobot.sql.schema import (
    PLATFORM_SIZE,
    USER_ID_SIZE,
    conversations,
    errors,
    inbox,
    journal,
    messages,
    model_usage,
    outbox,
    samples,
    steps,
    usage,
)
from turbobot.store import (
    FINAL_STATUSES,
    BaseStore,
    ConversationRecord,
    InboxItem,
    IncomingBatchError,
    LeaseLostError,
    OutgoingRecord,
    Recovery,
    StepWrite,
    TokenUsage,
    TranscriptLine,
    utc_day,
)

__all__ = ["SQLStore", "channel_column", "configure_sqlite_engine", "parse_channel_column"]

_log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("running", "waiting")
_R = TypeVar("_R")


#: seconds a commit waits for another process's lock on the SQLite file
_SQLITE_LOCK_WAIT = 10.0


def _dumps(value: Any) -> str:
    """Compact JSON of the runtime's own dicts (messages, contexts): orjson, ten times faster."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson refuses: lone surrogates, ints beyond 64 bits, int keys
        return to_json(value)


#: maps every digit to "0", "-" to itself and any other byte to " " (see _long_number)
_DIGITS = bytes(48 if 48 <= i <= 57 else 45 if i == 45 else 32 for i in range(256))


def _long_number(text: str) -> bool:
    """Whether ``text`` may hold an integer orjson reads wrongly (as a float): one of
    20 digits or more, or of 19 after a minus (a snowflake id's 19 digits are fine).

    Digits inside strings count too: the slower decoder is then used, correctly. A
    translation and two substring searches in C: ~20 times faster than a regex.
    """
    shape = text.encode("utf-8", "surrogatepass").translate(_DIGITS)
    return b"00000000000000000000" in shape or b"-0000000000000000000" in shape


def _loads(text: str) -> Any:
    """JSON written by this store, read back equal: orjson, ten times faster, where it can.

    The standard library's decoder reads what orjson refuses (lone surrogate escapes)
    or would change (integers beyond 64 bits).
    """
    if not _long_number(text):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


def _loads_many(texts: list[str]) -> list[Any]:
    """``[_loads(t) for t in texts]``, in one orjson call when it can (a long journal)."""
    joined = "[" + ",".join(texts) + "]"
    if not _long_number(joined):
        try:
            values: list[Any] = orjson.loads(joined)
            return values
        except orjson.JSONDecodeError:
            pass
    return [_loads(text) for text in texts]


def _journal_row(
    record: ConversationRecord, seq: int, entry: JournalEntry
) -> tuple[str, int, str, str, str, str | None]:
    """A journal row. An input from the channel's inbox refers to it, not a copy."""
    value = entry.value
    if entry.kind == "input" and type(value) is dict:
        incoming = value.get("incoming")
        if (
            type(incoming) is dict
            and incoming.get("text") == value.get("text")
            and incoming.get("key") == record.key.to_dict()
            and type(incoming.get("message_id")) is str
        ):
            message_id = writable_text(incoming["message_id"])
            return (record.id, seq, entry.kind, "null", entry.chain, message_id)
    return (record.id, seq, entry.kind, to_json(value), entry.chain, None)


def _input_value(incoming: dict[str, Any]) -> dict[str, Any]:
    """The value of an input journaled by reference, from its inbox row's payload."""
    return {"text": incoming["text"], "incoming": incoming}


# A step writes its channel several times in a row; 256 entries cover a few batches.
@functools.lru_cache(maxsize=256)
def channel_column(key: ChannelKey) -> str:
    """A channel key as stored: a JSON array, ``["platform", "channel", null, null]``.

    Built by hand because it runs several times per message; the text is exactly what
    ``json.dumps(list(key), ensure_ascii=False)`` gives (rows are looked up by it).
    """
    text = "[" + ", ".join("null" if p is None else _json_string(p) for p in key) + "]"
    # Escaped only when it must be (a lone surrogate or NUL in a name): still unique.
    return text if not unwritable(text) else json.dumps(list(key))


def parse_channel_column(value: str) -> ChannelKey:
    platform, channel, thread, user = _loads(value)
    return ChannelKey(platform, channel, thread, user)


_Rows = list[tuple[Any, ...]]
_NONE: _Rows = []  # shared, never appended to


@dataclass(slots=True)
class _Op:
    """The rows of one operation (one page of incoming messages, or one step).

    Operations are committed together, grouped by statement; one that cannot be
    written (a value the database refuses) is found by committing them one by one,
    and only it is dropped (see ``SQLStore._commit_isolating``).
    """

    #: the channel, for the log when this operation cannot be written
    channel: str
    incoming: _Rows = field(default_factory=lambda: _NONE)
    #: resolved with the incoming rows' seqs (``None``: seen before)
    future: asyncio.Future[list[int | None]] | None = None
    new_conversation: tuple[Any, ...] | None = None
    #: the conversation's state columns, its id last
    state: tuple[Any, ...] | None = None
    #: (conversation id, first journal seq to delete): a journal cut back (``/retry``)
    rewind: tuple[str, int] | None = None
    journal: _Rows = field(default_factory=lambda: _NONE)
    messages: _Rows = field(default_factory=lambda: _NONE)
    outgoing: _Rows = field(default_factory=lambda: _NONE)
    sent: _Rows = field(default_factory=lambda: _NONE)
    consumed: _Rows = field(default_factory=lambda: _NONE)
    #: tokens to add: (platform, user id, day, prompt, completion, generations)
    usage: _Rows = field(default_factory=lambda: _NONE)
    #: the operator's records: step timings, errors, gauges (never fenced: they
    #: describe what happened, whoever holds the channel now)
    steps: _Rows = field(default_factory=lambda: _NONE)
    #: tokens per (day, model) to add: (day, model, prompt, completion, calls, seconds)
    model_usage: _Rows = field(default_factory=lambda: _NONE)
    errors: _Rows = field(default_factory=lambda: _NONE)
    samples: _Rows = field(default_factory=lambda: _NONE)
    #: why the database refused this operation (it was dropped)
    failure: BaseException | None = None
    #: for a page of incoming messages: the positions of the rows that were refused
    failed_rows: list[int] | None = None
    #: committed (or dropped as refused): a retry after a fault leaves it out
    done: bool = False
    #: a page split into one operation per message, once it had to be
    parts: list[_Op] | None = None
    #: the generation of the channel's lease the step was written under (several
    #: workers: the commit refuses it if the lease was lost since; see leases.py)
    fence: int | None = None

    def touches(self, channel: str) -> bool:
        """Whether this writes rows a read of ``channel`` sees (a step is one channel's;
        a page of incoming messages, its rows' channels)."""
        return self.channel == channel or any(row[0] == channel for row in self.incoming)


def _split_incoming(op: _Op) -> list[_Op]:
    """A page of incoming messages as one operation per message (same future)."""
    return [_Op(op.channel, incoming=[row], future=op.future) for row in op.incoming]


@dataclass(slots=True)
class _Batch:
    """Operations waiting for the next commit, and who waits for it."""

    ops: list[_Op] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def size(self) -> int:
        return len(self.ops)


@dataclass(slots=True)
class _Merged:
    """The rows of several operations grouped by statement, in operation order."""

    incoming: _Rows
    new_conversations: _Rows
    #: the last state written per conversation (within a transaction, only it matters)
    conversation_states: _Rows
    rewinds: _Rows
    journal: _Rows
    messages: _Rows
    outgoing: _Rows
    sent: _Rows
    consumed: _Rows
    #: one row per user and day (an upsert may not touch a row twice in one statement)
    usage: _Rows
    steps: _Rows
    model_usage: _Rows
    errors: _Rows
    samples: _Rows

    @classmethod
    def of(cls, ops: Sequence[_Op]) -> _Merged:
        if len(ops) == 1:
            op = ops[0]
            return cls(
                op.incoming,
                [op.new_conversation] if op.new_conversation else _NONE,
                [op.state] if op.state else _NONE,
                [op.rewind] if op.rewind else _NONE,
                op.journal,
                op.messages,
                op.outgoing,
                op.sent,
                op.consumed,
                _summed(op.usage) if len(op.usage) > 1 else op.usage,
                op.steps,
                _summed(op.model_usage, 2) if len(op.model_usage) > 1 else op.model_usage,
                op.errors,
                op.samples,
            )
        merged = cls([], [], [], [], [], [], [], [], [], [], [], [], [], [])
        states: dict[str, tuple[Any, ...]] = {}
        for op in ops:
            if op.incoming:
                merged.incoming += op.incoming
            if op.new_conversation:
                merged.new_conversations.append(op.new_conversation)
            if op.state:
                states[op.state[-1]] = op.state
            if op.rewind:
                merged.rewinds.append(op.rewind)
            if op.journal:
                merged.journal += op.journal
            if op.messages:
                merged.messages += op.messages
            if op.outgoing:
                merged.outgoing += op.outgoing
            if op.sent:
                merged.sent += op.sent
            if op.consumed:
                merged.consumed += op.consumed
            if op.usage:
                merged.usage += op.usage
            if op.steps:
                merged.steps += op.steps
            if op.model_usage:
                merged.model_usage += op.model_usage
            if op.errors:
                merged.errors += op.errors
            if op.samples:
                merged.samples += op.samples
        merged.conversation_states = list(states.values())
        if len(merged.usage) > 1:
            merged.usage = _summed(merged.usage)
        if len(merged.model_usage) > 1:
            merged.model_usage = _summed(merged.model_usage, 2)
        return merged


def _usage_key(text: str, size: int) -> str:
    """A platform or user id as the ``usage`` table keys it: writable, and at most
    ``size`` characters (a longer id is stood for by its hash). The same on writes and
    reads, so a hostile id is counted like any other and never fails a step."""
    text = writable_text(text)
    if len(text) <= size:
        return text
    return "#" + hashlib.sha256(text.encode()).hexdigest()[: size - 1]


def _author(context: Mapping[str, Any]) -> str | None:
    """The user who began a conversation, as its stored context names them."""
    author = context.get("author_id")
    return _usage_key(author, USER_ID_SIZE) if isinstance(author, str) and author else None


def _total(value: int) -> int:
    """A usage count as a BIGINT column takes it (what is not a count is 0)."""
    return value if type(value) is int and 0 <= value < 2**62 else 0


def _summed(rows: _Rows, keys: int = 3) -> _Rows:
    """Usage rows added up per key (their first ``keys`` columns: platform, user and
    day; or day and model), so that one upsert touches each row once."""
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        key = row[:keys]
        total = sums.get(key)
        if total is None:
            sums[key] = list(row[keys:])
        else:
            for i, value in enumerate(row[keys:]):
                total[i] += value
    return [(*key, *counts) for key, counts in sums.items()]


# Column orders of the rows above; each statement is checked against its order once.
_INBOX_ROW = ("channel", "message_id", "payload", "received_at", "consumed")
_CONVERSATION_ROW = tuple(c.name for c in conversations.c)
_STATE_ROW = ("b_status", "b_yields", "b_deadline", "b_broken", "b_ended_at", "b_id")
_JOURNAL_ROW = tuple(c.name for c in journal.c)
_MESSAGE_ROW = tuple(c.name for c in messages.c if c.name != "id")
_OUTBOX_ROW = ("id", "channel", "text", "created_at", "sent")
_SENT_ROW = ("b_platform_id", "b_sent_at", "b_id")
_CONSUMED_ROW = ("b_channel", "b_message_id")
_USAGE_ROW = tuple(c.name for c in usage.c)
_STEP_ROW = tuple(c.name for c in steps.c if c.name != "id")
_MODEL_USAGE_ROW = tuple(c.name for c in model_usage.c)
_ERROR_ROW = tuple(c.name for c in errors.c if c.name != "id")
_SAMPLE_ROW = tuple(c.name for c in samples.c if c.name != "id")


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
        max_retry_delay: the longest pause between tries of a commit the database
            refuses for a while (full disk, read-only file, lost connection).
        worker: this worker's name, when several workers share the (PostgreSQL)
            database: the store then has :attr:`leases`, and commits a step only
            while the worker holds its channel's lease (see ``turbobot.sql.leases``).
        lease_seconds: how long a worker's lease lasts unless renewed.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_window: float = 0.0,
        max_batch: int = 5000,
        sqlite_synchronous: str = "FULL",
        upgrade: bool | None = None,
        max_retry_delay: float = 5.0,
        worker: str | None = None,
        lease_seconds: float = 10.0,
    ) -> None:
        self.url = url
        self.worker = worker
        self.lease_seconds = lease_seconds
        self.leases: SQLLeases | None = None
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.max_retry_delay = max_retry_delay
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
        #: the batch being committed, while it is
        self._committing: _Batch | None = None
        self._closing = False
        #: the writer's own connection to a SQLite file (see ``_commit_sqlite``)
        self._sqlite: sqlite3.Connection | None = None
        #: a read-only connection to the same file, read on the loop's thread (see
        #: ``_read_sqlite``)
        self._reader: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self.engine is not None:
            return
        options: dict[str, Any] = {}
        if self.worker is not None and not self.is_sqlite:
            # A worker stopped (SIGSTOP, a frozen VM) inside a transaction would keep its
            # fence's row locks, and so the channels, until its TCP session died: the
            # server ends such a session after a lease's time.
            idle = str(int(max(5.0, self.lease_seconds) * 1000))
            options["connect_args"] = {
                "server_settings": {"idle_in_transaction_session_timeout": idle}
            }
            # Channels taken are read at once, several at a time: a pool of 5 made
            # PostgreSQL sessions come and go (at most 15 + 1 listening; README).
            options.update(pool_size=10, max_overflow=5)
        try:
            engine = create_async_engine(self.url, **options)
        except ImportError as exc:
            raise ConfigurationError(
                f"the database driver for {self.url.split(':', 1)[0]} is missing ({exc.name}); "
                "install it, e.g. pip install 'turbobot[postgres]' for PostgreSQL"
            ) from exc
        if self.is_sqlite:
            if self.worker is not None:
                await engine.dispose()
                raise ConfigurationError(
                    "several workers share a PostgreSQL database; a SQLite file belongs to "
                    "one process: set TURBOBOT_DATABASE_URL to a postgresql+asyncpg:// URL"
                )
            configure_sqlite_engine(engine, self.sqlite_synchronous)
            _create_private(make_url(self.url).database)

        from turbobot.sql.migrate import check_schema, upgrade_schema

        try:
            async with engine.begin() as conn:
                await conn.run_sync(upgrade_schema if self.upgrade else check_schema)
        except BaseException:
            await engine.dispose()
            raise
        if self.worker is not None:
            leases = SQLLeases(engine, self.worker, self.lease_seconds)
            try:
                await leases.open()
            except BaseException:
                await engine.dispose()
                raise
            self.leases = leases
        self.engine = engine
        path = make_url(self.url).database if self.is_sqlite else None
        if path and path != ":memory:" and not path.startswith("file:"):
            self._sqlite = _connect_sqlite(path, self.sqlite_synchronous)
            self._reader = _connect_sqlite_reader(path)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="turbobot-sqlite-commit")
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
        if self.leases is not None:
            await self.leases.aclose()
            self.leases = None
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
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
            (
                channel_column(message.key),
                writable_text(message.message_id),
                _dumps(message.to_dict()),
                message.timestamp,
                False,
            )
            for message in messages
        ]
        self._batch.ops.append(_Op(rows[0][0], incoming=rows, future=future))
        self._queued()
        return await future

    async def write(self, step: StepWrite) -> None:
        # Everything is copied now: the caller goes on changing its objects. Encoding
        # happens here too, so a value that cannot be encoded raises in the caller and
        # nothing of its step is queued.
        self._check_writer()
        if step.rewind:
            # Rows the cut removes may still be queued: commit them first, so that the
            # delete (which runs before inserts in a batch) finds them.
            await self.flush()
        record = step.record
        channel = ""
        op = _Op(channel)
        if record is not None:
            channel = op.channel = channel_column(record.key)
            if step.new_conversation:
                op.new_conversation = (
                    record.id,
                    channel,
                    record.template_ref,
                    _dumps(record.context),
                    record.status,
                    record.yields,
                    record.deadline,
                    record.broken,
                    record.started_at,
                    record.ended_at,
                    _usage_key(record.key.platform, PLATFORM_SIZE),
                    _author(record.context),
                )
            else:
                op.state = (
                    record.status,
                    record.yields,
                    record.deadline,
                    record.broken,
                    record.ended_at,
                    record.id,
                )
            if step.rewind:
                op.rewind = (record.id, step.journal_start)
            if step.journal:
                start = step.journal_start
                op.journal = [
                    _journal_row(record, start + offset, entry)
                    for offset, entry in enumerate(step.journal)
                ]
            if step.transcript:
                op.messages = [
                    (
                        line.conversation_id,
                        channel,
                        line.role,
                        "" if line.message_id is not None else writable_text(line.text),
                        line.at,
                        count(line.prompt_tokens),
                        count(line.completion_tokens),
                        None if line.message_id is None else writable_text(line.message_id),
                        line.reply_id,
                        line.streamed or None,
                    )
                    for line in step.transcript
                ]
        if step.outgoing:
            op.outgoing = [
                (
                    outgoing.id,
                    channel
                    if record is not None and outgoing.key == record.key
                    else channel_column(outgoing.key),
                    writable_text(outgoing.text),
                    outgoing.created_at,
                    False,
                )
                for outgoing in step.outgoing
            ]
            if not op.channel:
                op.channel = op.outgoing[0][1]
        if step.sent:
            now = time.time()
            op.sent = [
                (None if p is None else writable_text(p), now, sent_id) for sent_id, p in step.sent
            ]
        if step.consumed:
            op.consumed = [
                (channel_column(key), writable_text(message_id))
                for key, message_id in step.consumed
            ]
            if not op.channel:
                op.channel = op.consumed[0][0]
        if step.usage:
            op.usage = [
                (
                    _usage_key(used.platform, PLATFORM_SIZE),
                    _usage_key(used.user_id, USER_ID_SIZE),
                    used.day,
                    _total(used.prompt_tokens),
                    _total(used.completion_tokens),
                    _total(used.generations),
                )
                for used in step.usage
            ]
        if step.stats or step.errors or step.samples:
            self._operator_rows(op, step)
        if self.leases is not None and op.channel:
            generation = self.leases.generation(op.channel)
            if generation is None:
                # The channel is not this worker's (any more): never committed. The
                # runtime learns it from leases.holds() before it would send a reply.
                _log.debug("SQL store: a step for %s is not written: lease lost", op.channel)
                return
            op.fence = generation
        self._batch.ops.append(op)
        self._queued()

    async def _settle(self, channel: str) -> None:
        """Wait until what this process wrote for ``channel`` is committed (before
        reading it back). Only a channel with writes queued or being committed waits:
        a conversation coming back from eviction has usually long been committed, and
        waiting for everyone's writes (``flush``) cost each load a commit."""
        self._check_writer()
        for batch in (self._batch, self._committing):
            if batch is not None and any(op.touches(channel) for op in batch.ops):
                await self.flush()
                return

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
            self._committing = batch
            if batch.ops or batch.waiters:
                try:
                    began = time.perf_counter()
                    inserted = await self._commit_riding_out(batch.ops) if batch.ops else {}
                    if self.on_commit is not None and batch.ops:
                        self.on_commit(len(batch.ops), time.perf_counter() - began)
                except Exception as exc:
                    # Only when closing (the fault did not clear in time) or on a bug.
                    _log.exception(
                        "SQL store: %d writes could not be committed and are lost; messages "
                        "not committed are not answered, their senders must send them again",
                        len(batch.ops) + len(self._batch.ops),
                    )
                    self._failure = exc
                    pending, self._batch = self._batch, _Batch()
                    for failed in (batch, pending):
                        for op in failed.ops:
                            if op.future is not None and not op.future.done():
                                op.future.set_exception(exc)
                        for waiter in failed.waiters:
                            if not waiter.done():
                                waiter.set_exception(exc)
                    self._busy = False
                    self._committing = None
                    return
                for op in batch.ops:
                    future = op.future
                    if future is not None and not future.done():
                        if op.failure is not None:
                            seqs = [inserted.pop(row[:2], None) for row in op.incoming]
                            error = IncomingBatchError(seqs, op.failed_rows)
                            error.__cause__ = op.failure
                            future.set_exception(error)
                        else:
                            # a row starts with its channel and message id
                            future.set_result([inserted.pop(row[:2], None) for row in op.incoming])
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            self._busy = False
            self._committing = None
            if self._closing and not self._batch.size() and not self._batch.waiters:
                return

    async def _commit_riding_out(self, ops: list[_Op]) -> dict[tuple[str, str], int]:
        """Commit ``ops``, waiting out faults of the database itself.

        A failed transaction rolled back whole, so trying it again is safe. A locked
        SQLite file, a full disk, a read-only file, a dropped PostgreSQL connection:
        the same batch is tried again with a growing pause (up to ``max_retry_delay``)
        until it goes through; writes made meanwhile wait in the next batch, in RAM.
        Only when the store is closing does it give up after a few tries.
        """
        failures = 0
        inserted: dict[tuple[str, str], int] = {}
        while True:
            try:
                # Only what is not committed yet: when the batch had to be split, some
                # operations may have gone through before the fault.
                await self._commit_isolating([op for op in ops if not op.done], inserted)
            except Exception as exc:
                if not _transient(exc):
                    raise
                failures += 1
                if self._closing and failures > 3:
                    raise
                delay = min(self.max_retry_delay, 0.05 * 2 ** min(failures, 16))
                log = _log.warning if failures == 1 or failures % 20 == 0 else _log.debug
                log(
                    "SQL store: cannot commit (%s: %s); %d writes wait in memory, trying "
                    "again in %.2fs (check disk space and that the database is writable)",
                    type(exc).__name__,
                    _first_line(exc),
                    len(ops) + len(self._batch.ops),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if failures:
                _log.warning("SQL store: commits go through again after %d failed tries", failures)
            return inserted

    async def _commit_isolating(self, ops: list[_Op], inserted: dict[tuple[str, str], int]) -> None:
        """Commit ``ops`` together; if the database refuses a value, commit the others.

        Committed one by one, the operation that cannot be written is found, logged
        with its channel and dropped (``op.failure``); every other one commits. Each
        operation is marked ``done`` once committed (or dropped), and the seqs of its
        incoming rows are added to ``inserted``.
        """
        if not ops:
            return
        try:
            inserted.update(await self._commit(ops))
        except Exception as exc:
            if _transient(exc):
                raise
            if len(ops) > 1:
                for op in ops:
                    if not op.done:
                        await self._commit_isolating([op], inserted)
                return
            op = ops[0]
            if len(op.incoming) > 1:
                if op.parts is None:
                    op.parts = _split_incoming(op)
                for part in op.parts:
                    if not part.done:
                        await self._commit_isolating([part], inserted)
                op.failure = next((p.failure for p in op.parts if p.failure), None)
                op.failed_rows = [i for i, p in enumerate(op.parts) if p.failure]
                op.done = True
                return
            op.failure = exc
            op.done = True
            _log.error(
                "SQL store: a write for channel %s cannot be stored and is dropped "
                "(%s: %s); every other write goes on",
                op.channel,
                type(exc).__name__,
                _first_line(exc),
            )
            return
        for op in ops:
            op.done = True

    @staticmethod
    def _operator_rows(op: _Op, step: StepWrite) -> None:
        """The step's timings, errors and gauges as rows (see schema.steps)."""
        own = step.record.key if step.record is not None else None

        def column(key: ChannelKey) -> str:  # (the step's own channel is written already)
            return op.channel if key == own else channel_column(key)

        op.steps = [
            (
                stats.conversation_id,
                column(stats.key),
                _usage_key(stats.key.platform, PLATFORM_SIZE),
                None if stats.user_id is None else _usage_key(stats.user_id, USER_ID_SIZE),
                stats.trigger,
                stats.at,
                stats.waited,
                stats.first_reply,
                stats.llm_seconds,
                stats.duration,
                None if stats.model is None else writable_text(stats.model)[:64],
                count(stats.prompt_tokens),
                count(stats.completion_tokens),
                _total(stats.generations),
                _total(stats.replies),
                stats.error,
            )
            for stats in step.stats
        ]
        op.model_usage = [
            (
                utc_day(stats.at),
                writable_text(stats.model or "")[:64],
                _total(stats.prompt_tokens or 0),
                _total(stats.completion_tokens or 0),
                _total(stats.generations),
                stats.llm_seconds,
            )
            for stats in step.stats
            if stats.generations
        ]
        op.errors = [
            (
                error.at,
                writable_text(error.kind)[:32],
                None if error.key is None else column(error.key),
                error.conversation_id,
                error.reply_id,
                writable_text(error.detail)[:500],
            )
            for error in step.errors
        ]
        op.samples = [
            (
                sample.at,
                writable_text(sample.worker)[:128],
                sample.live,
                sample.queued,
                sample.evictions,
                sample.replays,
            )
            for sample in step.samples
        ]

    def _statements(self, batch: _Merged) -> list[tuple[_Prepared, list[tuple[Any, ...]]]]:
        """The batch's statements with their rows, in an order the foreign keys accept."""
        prepared = self._prepared
        return [
            (statement, rows)
            for statement, rows in (
                (prepared.new_conversation, batch.new_conversations),
                (prepared.conversation_state, batch.conversation_states),
                (prepared.rewind, batch.rewinds),
                (prepared.journal, batch.journal),
                (prepared.message, batch.messages),
                (prepared.outgoing, batch.outgoing),
                (prepared.sent, batch.sent),
                (prepared.consumed, batch.consumed),
                (prepared.usage, batch.usage),
                (prepared.steps, batch.steps),
                (prepared.model_usage, batch.model_usage),
                (prepared.errors, batch.errors),
                (prepared.samples, batch.samples),
            )
            if rows
        ]

    async def _commit(self, ops: list[_Op]) -> dict[tuple[str, str], int]:
        if self._sqlite is not None:
            batch = _Merged.of(ops)
            return await self._commit_sqlite(self._sqlite, batch, batch.incoming)
        inserted: dict[tuple[str, str], int] = {}
        leases = self.leases
        async with self._engine().connect() as conn:
            transaction = await conn.begin()
            try:
                # The transaction's id, to learn its fate if the answer to COMMIT is lost.
                txid = (await conn.exec_driver_sql("SELECT txid_current()")).scalar_one()
                if leases is not None:
                    ops = await self._fenced(conn, leases, ops)
                batch = _Merged.of(ops)
                incoming = batch.incoming
                if incoming:
                    # Duplicates (a redelivered platform message) are skipped by the unique
                    # constraint, within this batch and across the whole history.
                    result = await conn.execute(
                        self._prepared.insert_incoming_returning,
                        [dict(zip(_INBOX_ROW, row, strict=True)) for row in incoming],
                    )
                    inserted = {(r.channel, r.message_id): int(r.seq) for r in result}
                    if leases is not None and inserted:
                        await leases.announce(conn, [channel for channel, _ in inserted])
                for statement, rows in self._statements(batch):
                    await conn.exec_driver_sql(statement.sql, rows)
            except BaseException:
                with contextlib.suppress(Exception):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except Exception as exc:
                if not _transient(exc):
                    raise
                # The COMMIT may have gone through before the connection failed: trying
                # the batch again would then take its own messages for redeliveries.
                if await self._committed(int(txid)):
                    _log.warning(
                        "SQL store: the answer to a COMMIT was lost (%s); the transaction "
                        "was committed",
                        type(exc).__name__,
                    )
                    return inserted
                raise
        return inserted

    @staticmethod
    async def _fenced(conn: AsyncConnection, leases: SQLLeases, ops: list[_Op]) -> list[_Op]:
        """The operations this worker may still commit: steps whose lease generation is
        current (checked, and share-locked, in this transaction), and pages of incoming
        messages. The others are dropped for good: a lost lease is never regained (a
        take raises the generation)."""
        wanted = [(op.channel, op.fence) for op in ops if op.fence is not None]
        if not wanted:
            return ops
        current = await leases.fence(conn, wanted)
        allowed = []
        for op in ops:
            if op.fence is None or current.get(op.channel) == op.fence:
                allowed.append(op)
            elif not op.done:
                op.failure = LeaseLostError(op.channel)
                op.done = True
                _log.info(
                    "SQL store: a step for channel %s is not committed: another worker "
                    "took the channel",
                    op.channel,
                )
        return allowed

    async def _committed(self, txid: int) -> bool:
        """Whether PostgreSQL transaction ``txid`` committed (asked on a new connection).

        Waits, with backoff, until the server can tell: until then nothing can be
        committed anyway, and guessing would lose or duplicate inputs.
        """
        pause = 0.05
        while True:
            try:
                async with self._engine().connect() as conn:
                    status = (
                        await conn.exec_driver_sql(f"SELECT txid_status({txid})")
                    ).scalar_one()
            except Exception as exc:
                if not _transient(exc):
                    raise
                status = None
            if status in ("committed", "aborted"):
                return bool(status == "committed")
            # unknown for now ('in progress' while the server notices the lost client)
            await asyncio.sleep(pause)
            pause = min(self.max_retry_delay, pause * 2)

    async def _commit_sqlite(
        self, raw: sqlite3.Connection, batch: _Merged, incoming: list[tuple[Any, ...]]
    ) -> dict[tuple[str, str], int]:
        """Commit on the store's own SQLite connection: statements here, the fsync off the loop.

        Through aiosqlite every statement would run in its thread, which needs the GIL
        back after each row while the event loop holds it: under load, the commit only
        progressed when the loop was idle. Here the rows are written by the loop's own
        thread (the CPU work is the same) and only ``COMMIT``, which waits for the
        disk with the GIL released, runs in a thread.
        """
        prepared = self._prepared
        await self._begin_immediate(raw)
        inserted: dict[tuple[str, str], int] = {}
        try:  # no await in here: nothing can interrupt these statements half way
            if incoming:
                # The write lock is held since BEGIN IMMEDIATE: rows after ``last`` are ours.
                (last,) = raw.execute(prepared.last_inbox_seq.sql).fetchone()
                raw.executemany(prepared.insert_incoming.sql, incoming)
                for seq, channel, message_id in raw.execute(prepared.inbox_since.sql, (last,)):
                    inserted[(channel, message_id)] = seq
            for statement, rows in self._statements(batch):
                raw.executemany(statement.sql, rows)
        except BaseException:
            raw.rollback()
            raise
        assert self._executor is not None
        committing = self._executor.submit(_commit_waiting, raw)
        try:
            await asyncio.shield(asyncio.wrap_future(committing))
        except asyncio.CancelledError:
            # The commit goes on in its thread and the connection is not free until it
            # ends (rolling back now would race it): wait for it, then give up.
            futures.wait([committing])
            if committing.exception() is not None and raw.in_transaction:
                raw.rollback()
            raise
        except BaseException:
            if raw.in_transaction:
                raw.rollback()
            raise
        return inserted

    async def _begin_immediate(self, raw: sqlite3.Connection) -> None:
        # Polled rather than waited for with busy_timeout, which would block the loop.
        for pause in _lock_pauses():
            if _unless_busy(raw.execute, "BEGIN IMMEDIATE"):
                return
            await asyncio.sleep(pause)
        raw.execute("BEGIN IMMEDIATE")  # a last try, which raises if still locked

    @functools.cached_property
    def _prepared(self) -> _Statements:
        return _Statements(self._engine().dialect)

    # -- reads ------------------------------------------------------------------------------

    async def load_conversation(
        self, key: ChannelKey, template_ref: str | None = None
    ) -> ConversationRecord | None:
        await self._settle(channel_column(key))  # read what this process wrote
        if self._reader is not None:
            with contextlib.suppress(sqlite3.OperationalError):  # (busy: the async way)
                return _read_sqlite(self._reader, _load_sqlite, key, template_ref)
        query = (
            select(conversations)
            .where(conversations.c.channel == channel_column(key))
            .where(conversations.c.status.in_(ACTIVE_STATUSES))
        )
        if template_ref is not None:
            query = query.where(conversations.c.template_ref == template_ref)
        query = query.order_by(conversations.c.started_at.desc(), conversations.c.id.desc())
        async with self._engine().connect() as conn:
            row = (await conn.execute(query.limit(1))).first()
            if row is None:
                return None
            record = _record(row._mapping)
            by_reference = and_(
                inbox.c.channel == channel_column(key), inbox.c.message_id == journal.c.message_id
            )
            entries = await conn.execute(
                select(journal.c.kind, journal.c.value, journal.c.chain, inbox.c.payload)
                .select_from(journal.outerjoin(inbox, by_reference))
                .where(journal.c.conversation_id == record.id)
                .order_by(journal.c.seq)
            )
            return _with_journal(record, entries.all())

    async def inbox(self, key: ChannelKey) -> list[InboxItem]:
        await self._settle(channel_column(key))
        if self._reader is not None:
            with contextlib.suppress(sqlite3.OperationalError):
                return _read_sqlite(self._reader, _inbox_sqlite, key)
        async with self._engine().connect() as conn:
            rows = await conn.execute(
                select(inbox.c.seq, inbox.c.payload)
                .where(inbox.c.channel == channel_column(key))
                .where(inbox.c.consumed.is_(False))
                .order_by(inbox.c.seq)
            )
            return [
                InboxItem(int(r.seq), IncomingMessage.from_dict(_loads(r.payload))) for r in rows
            ]

    async def recovery(
        self, template_ref: str | None = None, keys: Sequence[ChannelKey] | None = None
    ) -> Recovery:
        await self.flush()
        channels = None if keys is None else [channel_column(key) for key in keys]

        def only(query: Any, column: Any) -> Any:
            return query if channels is None else query.where(column.in_(channels))

        async with self._engine().connect() as conn:
            pending = await conn.execute(
                only(
                    select(inbox.c.seq, inbox.c.payload).where(inbox.c.consumed.is_(False)),
                    inbox.c.channel,
                ).order_by(inbox.c.seq)
            )
            items = [
                InboxItem(int(r.seq), IncomingMessage.from_dict(_loads(r.payload))) for r in pending
            ]
            active_rows = await conn.execute(
                only(
                    select(
                        conversations.c.channel,
                        conversations.c.status,
                        conversations.c.deadline,
                        conversations.c.broken,
                        conversations.c.template_ref,
                    ).where(conversations.c.status.in_(ACTIVE_STATUSES)),
                    conversations.c.channel,
                )
            )
            active: set[ChannelKey] = set()
            deadlines: list[tuple[ChannelKey, float]] = []
            running: list[ChannelKey] = []
            others: set[ChannelKey] = set()
            for r in active_rows:
                key = parse_channel_column(r.channel)
                if template_ref is not None and r.template_ref != template_ref:
                    others.add(key)
                    continue
                active.add(key)
                if r.status == "waiting" and r.deadline is not None:
                    deadlines.append((key, float(r.deadline)))
                elif r.status == "running" and not r.broken:
                    running.append(key)
            unsent_rows = await conn.execute(
                only(select(outbox).where(outbox.c.sent.is_(False)), outbox.c.channel).order_by(
                    outbox.c.id
                )
            )
            unsent = [
                OutgoingRecord(r.id, parse_channel_column(r.channel), r.text, r.created_at)
                for r in unsent_rows
            ]
        return Recovery(items, active, deadlines, unsent, running, others)

    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        await self.flush()
        query = select(conversations).order_by(conversations.c.id)
        if key is not None:
            query = query.where(conversations.c.channel == channel_column(key))
        async with self._engine().connect() as conn:
            return [_record(row._mapping) for row in await conn.execute(query)]

    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        await self.flush()
        by_reference = and_(
            inbox.c.channel == messages.c.channel, inbox.c.message_id == messages.c.message_id
        )
        query = (
            select(messages, inbox.c.payload)
            .select_from(messages.outerjoin(inbox, by_reference))
            .where(messages.c.channel == channel_column(key))
            .order_by(messages.c.id)
        )
        async with self._engine().connect() as conn:
            return [
                TranscriptLine(
                    r.conversation_id,
                    r.role,
                    r.text if r.payload is None else _loads(r.payload)["text"],
                    r.at,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.message_id,
                )
                for r in await conn.execute(query)
            ]

    async def usage(self, platform: str, user_id: str, since: str) -> list[TokenUsage]:
        await self.flush()
        query = (
            select(usage)
            .where(usage.c.platform == _usage_key(platform, PLATFORM_SIZE))
            .where(usage.c.user_id == _usage_key(user_id, USER_ID_SIZE))
            .where(usage.c.day >= since)
            .order_by(usage.c.day)
        )
        async with self._engine().connect() as conn:
            return [
                TokenUsage(
                    platform,
                    user_id,
                    r.day,
                    int(r.prompt_tokens),
                    int(r.completion_tokens),
                    int(r.generations),
                )
                for r in await conn.execute(query)
            ]


class _Prepared:
    """A statement compiled once for the engine's dialect, run with plain tuples.

    Group commits run thousands of rows per second through a few statements;
    handing the driver positional tuples skips SQLAlchemy's per-row parameter
    processing, which otherwise costs more than the database itself.
    """

    def __init__(self, statement: Any, dialect: Any, order: Sequence[str] = ()) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        found = tuple(compiled.positiontup or ())
        if found != tuple(order):
            raise RuntimeError(f"{self.sql!r} takes {found}, but rows are built as {order}")


class _Statements:
    """Every statement of the write path, for one dialect."""

    def __init__(self, dialect: Any) -> None:
        conflict = ["channel", "message_id"]
        upsert = sqlite_insert if dialect.name == "sqlite" else postgresql_insert
        skip_inbox = upsert(inbox).on_conflict_do_nothing(index_elements=conflict)
        self.insert_incoming = _Prepared(skip_inbox.values(_binds(_INBOX_ROW)), dialect, _INBOX_ROW)
        self.insert_incoming_returning = skip_inbox.returning(
            inbox.c.seq, inbox.c.channel, inbox.c.message_id
        )
        self.last_inbox_seq = _Prepared(
            select(func.coalesce(func.max(inbox.c.seq), literal_column("0"))), dialect
        )
        self.inbox_since = _Prepared(
            select(inbox.c.seq, inbox.c.channel, inbox.c.message_id).where(
                inbox.c.seq > bindparam("after")
            ),
            dialect,
            ("after",),
        )
        self.new_conversation = _Prepared(
            insert(conversations).values(_binds(_CONVERSATION_ROW)), dialect, _CONVERSATION_ROW
        )
        self.conversation_state = _Prepared(
            update(conversations)
            .where(conversations.c.id == bindparam("b_id"))
            .values(
                status=bindparam("b_status"),
                yields=bindparam("b_yields"),
                deadline=bindparam("b_deadline"),
                broken=bindparam("b_broken"),
                ended_at=bindparam("b_ended_at"),
            ),
            dialect,
            _STATE_ROW,
        )
        self.journal = _Prepared(
            insert(journal).values(_binds(_JOURNAL_ROW)), dialect, _JOURNAL_ROW
        )
        self.rewind = _Prepared(
            delete(journal)
            .where(journal.c.conversation_id == bindparam("b_id"))
            .where(journal.c.seq >= bindparam("b_seq")),
            dialect,
            ("b_id", "b_seq"),
        )
        self.message = _Prepared(
            insert(messages).values(_binds(_MESSAGE_ROW)), dialect, _MESSAGE_ROW
        )
        self.outgoing = _Prepared(insert(outbox).values(_binds(_OUTBOX_ROW)), dialect, _OUTBOX_ROW)
        self.sent = _Prepared(
            update(outbox)
            .where(outbox.c.id == bindparam("b_id"))
            .values(
                sent=true(),
                platform_id=bindparam("b_platform_id"),
                sent_at=bindparam("b_sent_at"),
            ),
            dialect,
            _SENT_ROW,
        )
        self.consumed = _Prepared(
            update(inbox)
            .where(inbox.c.channel == bindparam("b_channel"))
            .where(inbox.c.message_id == bindparam("b_message_id"))
            .values(consumed=true()),
            dialect,
            _CONSUMED_ROW,
        )
        self.steps = _Prepared(insert(steps).values(_binds(_STEP_ROW)), dialect, _STEP_ROW)
        self.errors = _Prepared(insert(errors).values(_binds(_ERROR_ROW)), dialect, _ERROR_ROW)
        self.samples = _Prepared(insert(samples).values(_binds(_SAMPLE_ROW)), dialect, _SAMPLE_ROW)
        per_model = upsert(model_usage)
        self.model_usage = _Prepared(
            per_model.values(_binds(_MODEL_USAGE_ROW)).on_conflict_do_update(
                index_elements=["day", "model"],
                set_={
                    name: model_usage.c[name] + per_model.excluded[name]
                    for name in _MODEL_USAGE_ROW[2:]
                },
            ),
            dialect,
            _MODEL_USAGE_ROW,
        )
        added = upsert(usage)
        self.usage = _Prepared(
            added.values(_binds(_USAGE_ROW)).on_conflict_do_update(
                index_elements=["platform", "user_id", "day"],
                set_={
                    name: usage.c[name] + added.excluded[name]
                    for name in ("prompt_tokens", "completion_tokens", "generations")
                },
            ),
            dialect,
            _USAGE_ROW,
        )


def _transient(exc: BaseException) -> bool:
    """An error of the database rather than of the rows: the same commit may go through later.

    A locked, full or read-only SQLite file, an I/O error, a lost PostgreSQL
    connection; on PostgreSQL, by SQLSTATE (which SQLAlchemy's asyncpg layer mostly
    reports as a plain DBAPIError): connection (08), transaction rollback such as a
    deadlock (40), insufficient resources such as a full disk (53), operator
    intervention such as a restart (57), system errors (58), a read-only transaction
    after a failover (25006), a lock not available (55P03). Refused values (encoding,
    range, constraints: classes 22 and 23) are not transient.
    """
    if isinstance(exc, (OperationalError, InterfaceError, sqlite3.OperationalError, OSError)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = _sqlstate(exc)
    return state[:2] in _TRANSIENT_CLASSES or state in ("25006", "55P03")


#: SQLSTATE classes of errors of the server rather than of the rows
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def _sqlstate(exc: DBAPIError) -> str:
    """The PostgreSQL SQLSTATE behind ``exc`` ("" when there is none)."""
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        state = getattr(error, "sqlstate", None)
        if isinstance(state, str):
            return state
    return ""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _lock_pauses() -> Iterator[float]:
    """Pauses between tries for a lock another connection holds, for _SQLITE_LOCK_WAIT s."""
    deadline = time.monotonic() + _SQLITE_LOCK_WAIT
    pause = 0.002
    while time.monotonic() < deadline:
        yield pause
        pause = min(pause * 2, 0.1)


def _unless_busy(call: Callable[..., object], *args: Any) -> bool:
    """``call(*args)``; ``False`` if another connection holds a lock (any other error raises)."""
    try:
        call(*args)
    except sqlite3.OperationalError as exc:
        # extended codes (SQLITE_BUSY_SNAPSHOT, ...) carry the primary one in the low byte
        if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise
        return False
    return True


def _commit_waiting(raw: sqlite3.Connection) -> None:
    """COMMIT, in the commit thread; a lock held by a reader (without WAL) is waited for.

    A busy COMMIT leaves the transaction open, to be committed again.
    """
    for pause in _lock_pauses():
        if _unless_busy(raw.commit):
            return
        time.sleep(pause)
    raw.commit()  # a last try, which raises if still locked


def _create_private(path: str | None) -> None:
    """Create a new SQLite database file readable by its owner only (conversations are
    private); SQLite gives its -wal and -shm files the same permissions. An existing
    file keeps the permissions its owner gave it."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # (a missing directory: the connection reports it, clearly, below)
    os.close(fd)


def configure_sqlite_engine(engine: AsyncEngine, synchronous: str = "FULL") -> None:
    """Pragmas on every connection, and transactions that hold DDL too.

    The sqlite3 module begins a transaction only before DML, so each ``ALTER TABLE`` of a
    migration committed on its own: a kill during ``db upgrade`` left a column added
    with the revision not recorded, and every later upgrade failed on it. BEGIN is
    emitted by hand instead (SQLAlchemy's documented recipe for pysqlite/aiosqlite).
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connected(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN: ours, below
        cursor = dbapi_connection.cursor()
        for pragma in _sqlite_pragmas(synchronous, busy_timeout_ms=10_000):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


def _sqlite_pragmas(synchronous: str, *, busy_timeout_ms: int) -> tuple[str, ...]:
    return (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={synchronous}",
        "PRAGMA foreign_keys=ON",
        f"PRAGMA busy_timeout={busy_timeout_ms}",
    )


def _connect_sqlite(path: str, synchronous: str) -> sqlite3.Connection:
    # Transactions are begun by hand (BEGIN IMMEDIATE); a lock is waited for by polling.
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in _sqlite_pragmas(synchronous, busy_timeout_ms=0):
        raw.execute(pragma)
    return raw


def _connect_sqlite_reader(path: str) -> sqlite3.Connection:
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    raw.row_factory = sqlite3.Row
    raw.execute("PRAGMA query_only=1")
    raw.execute("PRAGMA busy_timeout=0")  # never wait on the loop's thread
    return raw


def _read_sqlite(raw: sqlite3.Connection, read: Callable[..., _R], *args: Any) -> _R:
    """``read(raw, *args)`` in one read transaction, on the loop's thread.

    Through aiosqlite each row is fetched in its thread, which must get the GIL back
    from a busy event loop for every step: with a hundred conversations coming back from
    eviction at once, loads queued on the pool for over 30 s (bench/bench_million.py).
    A SQLite read in WAL mode never waits for a lock, and a conversation's rows take
    well under a millisecond to read, so here they are read directly (as the writer
    writes, see ``_commit_sqlite``). A busy database raises ``OperationalError``: the
    caller then reads the async way."""
    raw.execute("BEGIN")
    try:
        return read(raw, *args)
    finally:
        raw.execute("COMMIT")


_LOAD_SQL = (
    "SELECT id, channel, template_ref, context, status, yields, deadline, broken, "
    "started_at, ended_at FROM conversations WHERE channel = ? AND status IN "
    f"({', '.join(repr(s) for s in ACTIVE_STATUSES)}) "
)
_JOURNAL_SQL = (
    "SELECT journal.kind, journal.value, journal.chain, inbox.payload FROM journal "
    "LEFT OUTER JOIN inbox ON inbox.channel = ? AND inbox.message_id = journal.message_id "
    "WHERE journal.conversation_id = ? ORDER BY journal.seq"
)
_INBOX_SQL = "SELECT seq, payload FROM inbox WHERE channel = ? AND consumed = 0 ORDER BY seq"


def _load_sqlite(
    raw: sqlite3.Connection, key: ChannelKey, template_ref: str | None
) -> ConversationRecord | None:
    """``load_conversation`` as plain SQL (the same queries SQLAlchemy builds there)."""
    channel = channel_column(key)
    sql, params = _LOAD_SQL, [channel]
    if template_ref is not None:
        sql += "AND template_ref = ? "
        params.append(template_ref)
    row = raw.execute(sql + "ORDER BY started_at DESC, id DESC LIMIT 1", params).fetchone()
    if row is None:
        return None
    record = _record(row)
    return _with_journal(record, raw.execute(_JOURNAL_SQL, (channel, record.id)).fetchall())


def _with_journal(record: ConversationRecord, rows: Sequence[Any]) -> ConversationRecord:
    """``record`` with its journal from rows of (kind, value, chain, inbox payload)."""
    # Each row's JSON: its value, or (an input stored by reference) its inbox payload.
    values = _loads_many([v if p is None else p for _, v, _, p in rows])
    record.journal = [
        JournalEntry(kind, value if payload is None else _input_value(value), chain)
        for (kind, _, chain, payload), value in zip(rows, values, strict=True)
    ]
    return record


def _inbox_sqlite(raw: sqlite3.Connection, key: ChannelKey) -> list[InboxItem]:
    rows = raw.execute(_INBOX_SQL, (channel_column(key),)).fetchall()
    return [InboxItem(int(seq), IncomingMessage.from_dict(_loads(p))) for seq, p in rows]


def _binds(columns: Sequence[str]) -> dict[str, Any]:
    return {name: bindparam(name) for name in columns}


def _record(row: Any) -> ConversationRecord:
    status = row["status"]
    assert status in FINAL_STATUSES or status in ACTIVE_STATUSES
    return ConversationRecord(
        id=row["id"],
        key=parse_channel_column(row["channel"]),
        template_ref=row["template_ref"],
        context=_loads(row["context"]),
        status=status,
        yields=row["yields"],
        deadline=row["deadline"],
        broken=bool(row["broken"]),
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )
