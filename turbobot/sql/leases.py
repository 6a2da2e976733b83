"""Channel leases on PostgreSQL: several workers share one database.

A worker processes a channel only while it holds the channel's row in ``leases``
(docs/architecture.md, "Scale-out"). Leases expire on the database's clock unless
renewed; each take raises the row's ``generation``, and every step a worker commits
checks, in its own transaction, that the generation it was written under is still
the row's and unexpired (``SQLLeases.fence``, called by ``SQLStore``). A worker that
was frozen past its lease (a long pause, a network split) therefore cannot commit for
a channel another worker took.

Lease rows rather than advisory locks, by measurement (bench/bench_leases.py,
bench/HISTORY.md): rows cost about twice as much to take (72 against 33 ms for
10,000 channels) but carry a generation to fence with, and a frozen worker's
advisory locks live as long as its TCP session.

New inbox rows are announced with ``NOTIFY turbobot_inbox`` in the transaction that
commits them (payload: the committing worker's incarnation, then one channel per
line); each worker ``LISTEN``s on a connection of its own. A slow poll
(``orphans``, ``unread``) is the safety net for anything missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from turbobot.chat import ChannelKey
from turbobot.store import ChannelLeases, new_id

__all__ = ["NOTIFY_CHANNEL", "SQLLeases", "worker_status"]

_log = logging.getLogger(__name__)

#: the LISTEN/NOTIFY channel new inbox rows are announced on
NOTIFY_CHANNEL = "turbobot_inbox"
#: PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more
_PAYLOAD_BYTES = 7900
#: how long a take waits for a row another transaction holds (a commit's fence)
_TAKE_LOCK_WAIT = "2s"

_TTL = "make_interval(secs => CAST(:ttl AS double precision))"
#: Lease changes are not waited for on disk: a take, renewal or release that a crash
#: of the database loses costs no safety, since every step's commit checks the row
#: as the database has it (a lost take leaves an older generation: that worker's
#: steps are refused) and costs an fsync each otherwise.
_NOT_FLUSHED = "SET LOCAL synchronous_commit = off"

_CLAIM = text(
    f"""
WITH wanted AS (SELECT DISTINCT unnest(CAST(:channels AS text[])) AS channel),
free AS (
    -- expired, or this worker's name from an earlier run (never this run's own: taking
    -- it again would raise the generation under this run's own steps)
    SELECT l.channel FROM leases AS l JOIN wanted USING (channel)
    WHERE l.expires_at <= now() OR (l.worker = :worker AND l.incarnation <> :incarnation)
    ORDER BY l.channel
    FOR UPDATE OF l SKIP LOCKED
),
taken AS (
    UPDATE leases AS l
    SET worker = :worker, incarnation = :incarnation, generation = l.generation + 1,
        expires_at = now() + {_TTL}
    FROM free WHERE l.channel = free.channel
    RETURNING l.channel, l.generation
),
fresh AS (
    INSERT INTO leases (channel, worker, incarnation, generation, expires_at)
    SELECT channel, :worker, :incarnation, 1, now() + {_TTL} FROM wanted
    ORDER BY channel  -- (workers inserting the same channels in one order: no deadlock)
    ON CONFLICT (channel) DO NOTHING
    RETURNING channel, generation
)
SELECT channel, generation FROM taken UNION ALL SELECT channel, generation FROM fresh
"""
)

_RENEW = text(
    f"""
UPDATE leases SET expires_at = now() + {_TTL}
WHERE channel = ANY(CAST(:channels AS text[])) AND incarnation = :incarnation
  AND expires_at > now()
RETURNING channel, generation
"""
)

_RELEASE = text(
    """
UPDATE leases AS l SET expires_at = now()
FROM unnest(CAST(:channels AS text[]), CAST(:generations AS bigint[])) AS r(channel, generation)
WHERE l.channel = r.channel AND l.generation = r.generation AND l.incarnation = :incarnation
"""
)

_FENCE = text(
    """
SELECT channel, generation FROM leases
WHERE channel = ANY(CAST(:channels AS text[])) AND incarnation = :incarnation
  AND expires_at > now()
FOR SHARE
"""
)

_ORPHANS = text(
    """
SELECT w.channel FROM (
    SELECT channel FROM inbox WHERE consumed = false
    UNION SELECT channel FROM outbox WHERE sent = false
    UNION SELECT channel FROM conversations
        WHERE status = 'running' AND NOT broken
          AND template_ref = ANY(CAST(:refs AS text[]))
    UNION SELECT channel FROM conversations
        WHERE status = 'waiting' AND deadline <= :due
          AND template_ref = ANY(CAST(:refs AS text[]))
) AS w
WHERE NOT EXISTS (
    -- free: no lease, an expired one, or one of this worker's name from an earlier run
    SELECT 1 FROM leases AS l WHERE l.channel = w.channel AND l.expires_at > now()
      AND (l.incarnation = :incarnation OR l.worker <> :worker)
)
LIMIT :limit
"""
)

_UNREAD = text(
    """
SELECT DISTINCT i.channel FROM inbox AS i JOIN leases AS l ON l.channel = i.channel
WHERE i.consumed = false AND l.incarnation = :incarnation
"""
)

_REGISTER = text(
    """
INSERT INTO workers (name, incarnation, host, pid, started_at, seen_at, leases)
VALUES (:worker, :incarnation, :host, :pid, now(), now(), 0)
ON CONFLICT (name) DO UPDATE SET incarnation = excluded.incarnation, host = excluded.host,
    pid = excluded.pid, started_at = now(), seen_at = now(), leases = 0
"""
)

_PREVIOUS = text(
    """
SELECT host, pid, EXTRACT(EPOCH FROM now() - seen_at) AS idle FROM workers
WHERE name = :worker
"""
)

_SEEN = text(
    "UPDATE workers SET seen_at = now(), leases = :leases "
    "WHERE name = :worker AND incarnation = :incarnation"
)

_GONE = text("DELETE FROM workers WHERE name = :worker AND incarnation = :incarnation")


def default_worker_name() -> str:
    """This machine's name: one worker per machine needs no configuration."""
    return socket.gethostname() or "worker"


class SQLLeases(ChannelLeases):
    """Channel leases in the ``leases`` table of a PostgreSQL database.

    Args:
        engine: the store's engine.
        worker: this worker's name, unique among the running workers. A worker
            started again under its name takes that name's leases back at once
            (without waiting for them to expire); two running processes sharing a
            name would take channels from each other (correctly, but slowly).
        ttl: seconds a lease lasts unless renewed; a dead worker's channels wait
            this long before another worker takes them.
    """

    def __init__(self, engine: AsyncEngine, worker: str, ttl: float) -> None:
        if not worker or len(worker) > 128:
            raise ValueError("a worker's name is 1 to 128 characters")
        if not ttl > 0:
            raise ValueError("a lease lasts a positive number of seconds")
        self.engine = engine
        self.worker = worker
        self.ttl = float(ttl)
        #: this process's run of the worker
        self.incarnation = new_id()
        #: channel column → generation of the leases held
        self._held: dict[str, int] = {}
        #: channels held whose step a commit refused (taken and given back meanwhile,
        #: or expired): what this worker has of them in RAM is wrong until taken again
        self._refused: set[str] = set()
        #: when the last renewal began (monotonic): the leases it kept last a ttl from it
        self._renewed = time.monotonic()
        self._listener: asyncio.Task[None] | None = None
        self._opened = False
        self._subscribers: list[Callable[[list[ChannelKey] | None], None]] = []

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        async with self.engine.begin() as conn:
            previous = (await conn.execute(_PREVIOUS, {"worker": self.worker})).first()
            if previous is not None and float(previous.idle) < self.ttl:
                here = (socket.gethostname(), os.getpid())
                if (previous.host, previous.pid) != here:
                    _log.warning(
                        "a worker named %r was seen %.0fs ago on %s (pid %s): if it still "
                        "runs, give each worker its own name (TURBOBOT_WORKER_NAME); its "
                        "leases are taken over now",
                        self.worker,
                        float(previous.idle),
                        previous.host,
                        previous.pid,
                    )
            await conn.execute(_REGISTER, self._me(host=socket.gethostname(), pid=os.getpid()))
        self._opened = True
        if self._subscribers:
            self._start_listening()

    async def aclose(self) -> None:
        """Give every lease up (other workers take the channels at once) and leave."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        try:
            await self.release(self.held())
            async with self.engine.begin() as conn:
                await conn.execute(_GONE, self._me())
        except Exception as exc:  # the leases then expire by themselves
            _log.warning(
                "could not give the channel leases up (%s): they expire in %.0fs", exc, self.ttl
            )

    def _me(self, **more: Any) -> dict[str, Any]:
        return {"worker": self.worker, "incarnation": self.incarnation, "ttl": self.ttl, **more}

    # -- ChannelLeases ------------------------------------------------------------------

    def holds(self, key: ChannelKey) -> bool:
        channel = _column(key)
        return channel in self._held and channel not in self._refused

    def held(self) -> list[ChannelKey]:
        return [_key(channel) for channel in self._held]

    def generation(self, channel: str) -> int | None:
        """The generation this worker holds ``channel``'s lease at (``None``: not held)."""
        return self._held.get(channel)

    def fresh(self) -> bool:
        """Whether the leases held are surely still valid by the local clock (renewed
        within the last two thirds of a lease): if not, ask with :meth:`confirm`."""
        return time.monotonic() < self._renewed + self.ttl * 2 / 3

    async def confirm(self, key: ChannelKey) -> bool:
        channel = _column(key)
        generation = self._held.get(channel)
        if generation is None or channel in self._refused:
            return False
        async with self.engine.connect() as conn:
            current = await self.fence(conn, [(channel, generation)])
            await conn.rollback()
        return current.get(channel) == generation

    async def claim(self, keys: Sequence[ChannelKey]) -> list[ChannelKey]:
        wanted = [
            c
            for c in dict.fromkeys(_column(key) for key in keys)
            if c not in self._held or c in self._refused
        ]
        if not wanted:
            return []
        refused = [c for c in wanted if c in self._refused]
        if refused:  # (its row is this run's own: given up first, then taken again)
            await self.release([_key(c) for c in refused])
        async with self.engine.begin() as conn:
            # A row a commit's fence holds (FOR SHARE) is skipped, not waited for;
            # this bounds the wait for one a stopped worker's transaction holds.
            await conn.exec_driver_sql(
                f"SELECT set_config('lock_timeout', '{_TAKE_LOCK_WAIT}', true), "
                "set_config('synchronous_commit', 'off', true)"
            )
            rows = (await conn.execute(_CLAIM, self._me(channels=wanted))).all()
        for row in rows:
            self._held[row.channel] = int(row.generation)
            self._refused.discard(row.channel)
        return [_key(row.channel) for row in rows]

    async def renew(self) -> list[ChannelKey]:
        # Leases taken while this runs are not in the snapshot, and one taken again
        # meanwhile has another generation: only what the renewal could see is judged.
        before = dict(self._held)
        started = time.monotonic()
        async with self.engine.begin() as conn:
            await conn.exec_driver_sql(_NOT_FLUSHED)
            rows = (await conn.execute(_RENEW, self._me(channels=list(before)))).all()
            kept = {row.channel: int(row.generation) for row in rows}
            await conn.execute(_SEEN, self._me(leases=len(kept)))
        lost = [
            c
            for c, g in before.items()
            if kept.get(c) != g and self._held.get(c) == g  # (not taken again since)
        ]
        for channel in lost:
            del self._held[channel]
            self._refused.discard(channel)
        self._renewed = started
        if lost:
            _log.warning(
                "worker %s lost the leases of %d channels (it was paused or cut off for "
                "longer than %.0fs); other workers go on with them",
                self.worker,
                len(lost),
                self.ttl,
            )
        return [_key(channel) for channel in lost]

    async def release(self, keys: Sequence[ChannelKey]) -> None:
        given = {c: self._held.pop(c) for c in (_column(key) for key in keys) if c in self._held}
        if not given:
            return
        refused = {c for c in given if c in self._refused}
        self._refused -= refused
        try:
            async with self.engine.begin() as conn:
                await conn.exec_driver_sql(_NOT_FLUSHED)
                await conn.execute(
                    _RELEASE,
                    self._me(channels=list(given), generations=list(given.values())),
                )
        except BaseException:
            # Still held, then: renewed, and given up again later (never left behind
            # renewed by nobody and taken by no one).
            for channel, generation in given.items():
                self._held.setdefault(channel, generation)
            self._refused |= refused
            raise

    async def orphans(self, due: float, refs: Sequence[str], limit: int) -> list[ChannelKey]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(_ORPHANS, self._me(due=due, refs=list(refs), limit=limit))
            return [_key(row.channel) for row in rows]

    async def unread(self) -> list[ChannelKey]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(_UNREAD, self._me())
            return [_key(row.channel) for row in rows if row.channel in self._held]

    def subscribe(self, callback: Callable[[list[ChannelKey] | None], None]) -> None:
        self._subscribers.append(callback)
        if self._opened:
            self._start_listening()

    # -- the store's side -----------------------------------------------------------------

    async def fence(self, conn: AsyncConnection, wanted: list[tuple[str, int]]) -> dict[str, int]:
        """In a step's transaction: of the channels of ``wanted`` (channel, generation the
        step was written under), those this worker still holds, at their generation.
        The rows are share-locked until the transaction ends, so a take waits for the
        commit (or skips the channel)."""
        channels = list(dict.fromkeys(channel for channel, _ in wanted))
        rows = await conn.execute(_FENCE, self._me(channels=channels))
        current = {row.channel: int(row.generation) for row in rows}
        for channel, generation in wanted:
            if current.get(channel) != generation:
                # Refused: holds() says no from now on, even if the lease was taken
                # again since (the worker's state of the channel went past the store's).
                if self._held.get(channel) == generation:
                    del self._held[channel]
                elif channel in self._held:
                    self._refused.add(channel)
        return current

    async def announce(self, conn: AsyncConnection, channels: Sequence[str]) -> None:
        """In the transaction that commits inbox rows: tell the other workers."""
        head = self.incarnation
        payload = [head]
        size = len(head)
        for channel in dict.fromkeys(channels):
            length = len(channel.encode()) + 1
            if size + length > _PAYLOAD_BYTES and len(payload) > 1:
                await _notify(conn, "\n".join(payload))
                payload, size = [head], len(head)
            payload.append(channel)
            size += length
        if len(payload) > 1:
            await _notify(conn, "\n".join(payload))

    # -- notifications ----------------------------------------------------------------------

    def _start_listening(self) -> None:
        if self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name="turbobot:lease-listener"
            )

    def _tell(self, keys: list[ChannelKey] | None) -> None:
        for callback in self._subscribers:
            try:
                callback(keys)
            except Exception:
                _log.exception("a lease notification's receiver failed")

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        head, _, rest = payload.partition("\n")
        if head == self.incarnation or not rest:
            return  # this worker's own commit: it queued the messages itself
        self._tell([_key(channel) for channel in rest.split("\n")])

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # the driver (turbobot[postgres])

        # The dialect's own reading of the URL (its query options are SQLAlchemy's, not
        # all asyncpg's).
        _, params = self.engine.dialect.create_connect_args(self.engine.url)
        params = {k: v for k, v in params.items() if k != "prepared_statement_cache_size"}
        pause = 0.1
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(**params)
                closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                connection.add_termination_listener(functools.partial(_closed, closed))
                await connection.add_listener(NOTIFY_CHANNEL, self._received)
                self._tell(None)  # anything committed before now was not announced to us
                pause = 0.1
                await closed
                _log.warning("the lease notifications' connection closed; reconnecting")
            except asyncio.CancelledError:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), 1.0)
                raise
            except Exception as exc:
                _log.warning(
                    "cannot listen for new messages (%s: %s); trying again in %.1fs",
                    type(exc).__name__,
                    exc,
                    pause,
                )
            await asyncio.sleep(pause)
            pause = min(5.0, pause * 2)


def _closed(future: asyncio.Future[None], _connection: Any) -> None:
    if not future.done():
        future.set_result(None)


async def _notify(conn: AsyncConnection, payload: str) -> None:
    await conn.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {
            "channel": NOTIFY_CHANNEL,
            "payload": payload,
        },
    )


def _column(key: ChannelKey) -> str:
    from turbobot.sql.store import channel_column

    return channel_column(key)


def _key(channel: str) -> ChannelKey:
    from turbobot.sql.store import parse_channel_column

    return parse_channel_column(channel)


_STATUS_WORKERS = text(
    """
SELECT name, host, pid, started_at, EXTRACT(EPOCH FROM now() - seen_at) AS idle,
    (SELECT count(*) FROM leases AS l
     WHERE l.incarnation = w.incarnation AND l.expires_at > now()) AS leases
FROM workers AS w ORDER BY name
"""
)

_STATUS_TOTALS = text(
    """
SELECT
    (SELECT count(*) FROM inbox WHERE consumed = false) AS inbox,
    (SELECT count(DISTINCT channel) FROM inbox WHERE consumed = false) AS channels,
    (SELECT count(*) FROM outbox WHERE sent = false) AS unsent,
    (SELECT count(*) FROM leases WHERE expires_at > now()) AS leases,
    (SELECT count(DISTINCT i.channel) FROM inbox AS i WHERE i.consumed = false
     AND NOT EXISTS (SELECT 1 FROM leases AS l
                     WHERE l.channel = i.channel AND l.expires_at > now())) AS orphaned
"""
)


async def worker_status(engine: AsyncEngine) -> dict[str, Any]:
    """What ``turbobot status`` shows: the workers, their leases, the inbox's depth."""
    async with engine.connect() as conn:
        workers = [dict(row._mapping) for row in await conn.execute(_STATUS_WORKERS)]
        totals = dict((await conn.execute(_STATUS_TOTALS)).one()._mapping)
    return {"workers": workers, **totals}
