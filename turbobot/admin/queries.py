"""What the operator's page reads: paged, indexed queries on the store's tables.

Read-only: nothing here writes. Each list is newest first and paged by a cursor (the
last row's start time and id), so a page costs the same on the first page as on the
thousandth; filters use the indexes of migration 0005 (see docs/architecture.md,
"Operator's view"). Searching the text of messages is the exception: it reads the
transcripts (there is no full-text index that both SQLite and PostgreSQL have).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Integer, and_, cast, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from turbobot.sql.schema import (
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
from turbobot.sql.store import _loads
from turbobot.store import utc_day
from turbobot.template import INTERRUPTED

__all__ = ["PAGE", "STATES", "AdminData", "Filters"]

#: conversations per page
PAGE = 50
#: the states one can filter by: the stored statuses, and "timed_out" (a deadline fired)
STATES = ("waiting", "running", "finished", "timed_out", "diverged", "failed", "reset", "restarted")
#: the longest message each platform takes in one piece (the adapters' MESSAGE_LIMIT):
#: a longer reply was sent in parts
SPLIT_AT = {"telegram": 4096, "discord": 2000}
#: transcript lines and journal entries shown for one conversation (the newest)
LINES = 1000
#: steps read to draw the latency percentiles (the newest in the window)
LATENCY_ROWS = 50_000


@dataclass(frozen=True, slots=True)
class Filters:
    platform: str = ""
    state: str = ""
    user: str = ""
    text: str = ""
    #: the cursor: ``"<started_at>:<id>"`` of the last row of the page before
    before: str = ""

    def query(self, **changes: str) -> dict[str, str]:
        values = {
            "platform": self.platform,
            "state": self.state,
            "user": self.user,
            "q": self.text,
            "before": self.before,
            **changes,
        }
        return {k: v for k, v in values.items() if v}


@dataclass(slots=True)
class Line:
    """A transcript line as the user saw it."""

    role: str
    text: str
    at: float
    streamed: bool = False
    interrupted: bool = False
    #: sent in this many parts (a reply longer than the platform's limit)
    parts: int = 1
    #: ``None``: not a reply; else whether the platform has it
    sent: bool | None = None
    undeliverable: bool = False
    #: failed sends before it went through (or was given up)
    send_failures: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(slots=True)
class Conversation:
    row: dict[str, Any]
    lines: list[Line] = field(default_factory=list)
    journal: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: lines and journal entries left out (only the newest ``LINES`` are shown)
    earlier_lines: int = 0
    earlier_journal: int = 0


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere, its wildcards escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _text_like(as_json: str) -> str:
    """A LIKE pattern matching an inbox payload whose text holds ``as_json`` (the text
    searched for, JSON-escaped)."""
    escaped = _like(as_json)[1:-1]
    return f'%"text":"%{escaped}%","message_id":%'


def percentile(values: Sequence[float], share: float) -> float:
    """The ``share`` (0..1) percentile of sorted ``values`` (nearest rank)."""
    if not values:
        return math.nan
    rank = max(0, min(len(values) - 1, math.ceil(share * len(values)) - 1))
    return values[rank]


class AdminData:
    """Reads for the page, on an engine opened read-only (see ``turbobot.admin``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"

    async def _all(self, query: Any) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(query)).mappings()]

    async def _scalar(self, query: Any) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    def _bucket(self, column: Any, seconds: int) -> ColumnElement[Any]:
        """``column`` (epoch seconds) rounded down to ``seconds``, as an integer."""
        if self.is_sqlite:  # (CAST truncates there; PostgreSQL's rounds)
            return cast(column / seconds, Integer) * seconds
        return func.floor(column / seconds) * seconds

    # -- conversations --------------------------------------------------------------------

    async def platforms(self) -> list[str]:
        query = select(conversations.c.platform).where(conversations.c.platform.is_not(None))
        return sorted({r["platform"] for r in await self._all(query.distinct())})

    async def conversations(self, filters: Filters) -> tuple[list[dict[str, Any]], str | None]:
        """A page of conversations, newest first, and the cursor of the next page."""
        c = conversations.c
        query = select(
            c.id,
            c.channel,
            c.platform,
            c.user_id,
            c.status,
            c.template_ref,
            c.started_at,
            c.ended_at,
            c.broken,
        )
        if filters.platform:
            query = query.where(c.platform == filters.platform)
        if filters.user:
            query = query.where(c.user_id == filters.user)
        if filters.state == "timed_out":
            fired = select(steps.c.conversation_id).where(steps.c.trigger == "timeout")
            query = query.where(c.id.in_(fired))
        elif filters.state:
            query = query.where(c.status == filters.state)
        if filters.text:
            # Correlated (EXISTS), so that newest first the scan stops at a page of
            # matches; a rare text still reads every transcript (see the module's doc).
            said = (
                select(messages.c.id)
                .where(messages.c.conversation_id == c.id)
                .where(messages.c.text.like(_like(filters.text), escape="\\"))
            )
            # A user's line is stored once, with its inbox message (JSON: its text escaped).
            by_reference = and_(
                inbox.c.channel == messages.c.channel,
                inbox.c.message_id == messages.c.message_id,
            )
            as_json = json.dumps(filters.text, ensure_ascii=False)[1:-1]
            sent = (
                select(messages.c.id)
                .select_from(messages.join(inbox, by_reference))
                .where(messages.c.conversation_id == c.id)
                # Its text alone, not its keys, ids or names: the store writes a payload
                # as compact JSON whose "text" comes right before "message_id"
                # (IncomingMessage.to_dict; a test holds it). Parsing the JSON in SQL
                # would fail on PostgreSQL for a text with a lone surrogate.
                .where(inbox.c.payload.like(_text_like(as_json), escape="\\"))
            )
            query = query.where(or_(said.exists(), sent.exists()))
        cursor = _cursor(filters.before)
        if cursor is not None:
            at, last_id = cursor
            query = query.where(or_(c.started_at < at, and_(c.started_at == at, c.id < last_id)))
        query = query.order_by(c.started_at.desc(), c.id.desc()).limit(PAGE + 1)
        rows = await self._all(query)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        if rows:
            counted = (
                select(messages.c.conversation_id, func.count().label("lines"))
                .where(messages.c.conversation_id.in_([r["id"] for r in rows]))
                .group_by(messages.c.conversation_id)
            )
            lines = {r["conversation_id"]: r["lines"] for r in await self._all(counted)}
            for row in rows:
                row["lines"] = lines.get(row["id"], 0)
                row["channel"] = _channel_text(row["channel"])
        after = f"{rows[-1]['started_at']!r}:{rows[-1]['id']}" if more and rows else None
        return rows, after

    async def conversation(self, conversation_id: str) -> Conversation | None:
        found = await self._all(select(conversations).where(conversations.c.id == conversation_id))
        if not found:
            return None
        row = found[0]
        row["channel"] = _channel_text(row["channel"])
        result = Conversation(row)
        by_reference = and_(
            inbox.c.channel == messages.c.channel, inbox.c.message_id == messages.c.message_id
        )
        total = await self._scalar(
            select(func.count()).where(messages.c.conversation_id == conversation_id)
        )
        newest = (
            select(messages, inbox.c.payload, outbox.c.sent)
            .select_from(
                messages.outerjoin(inbox, by_reference).outerjoin(
                    outbox, outbox.c.id == messages.c.reply_id
                )
            )
            .where(messages.c.conversation_id == conversation_id)
            .order_by(messages.c.id.desc())
            .limit(LINES)
        )
        rows = list(reversed(await self._all(newest)))
        result.earlier_lines = max(0, int(total or 0) - len(rows))
        reply_ids = [r["reply_id"] for r in rows if r["reply_id"]]
        errors_found = await self._all(
            select(errors)
            .where(
                or_(
                    errors.c.conversation_id == conversation_id,
                    errors.c.reply_id.in_(reply_ids) if reply_ids else false(),
                )
            )
            .order_by(errors.c.at)
        )
        result.errors = errors_found
        failures = Counter(e["reply_id"] for e in errors_found if e["kind"] == "send")
        undeliverable = {e["reply_id"] for e in errors_found if e["kind"] == "undeliverable"}
        limit = SPLIT_AT.get(row.get("platform") or "")
        for r in rows:
            # (the store's reader: a lone surrogate, kept escaped in JSON, reads back)
            text = r["text"] if r["payload"] is None else _loads(r["payload"])["text"]
            line = Line(r["role"], text, r["at"], bool(r["streamed"]))
            line.prompt_tokens, line.completion_tokens = r["prompt_tokens"], r["completion_tokens"]
            if r["role"] == "assistant":
                line.interrupted = text.endswith(INTERRUPTED)
                if r["reply_id"] is not None and not line.interrupted:
                    line.sent = bool(r["sent"])
                    line.undeliverable = r["reply_id"] in undeliverable
                    line.send_failures = failures.get(r["reply_id"], 0)
                if limit:
                    line.parts = max(1, math.ceil(len(text) / limit))
            result.lines.append(line)
        entries = await self._scalar(
            select(func.count()).where(journal.c.conversation_id == conversation_id)
        )
        result.journal = list(
            reversed(
                await self._all(
                    select(journal.c.seq, journal.c.kind, journal.c.value, journal.c.message_id)
                    .where(journal.c.conversation_id == conversation_id)
                    .order_by(journal.c.seq.desc())
                    .limit(LINES)
                )
            )
        )
        result.earlier_journal = max(0, int(entries or 0) - len(result.journal))
        result.steps = await self._all(
            select(steps).where(steps.c.conversation_id == conversation_id).order_by(steps.c.at)
        )
        return result

    # -- usage ------------------------------------------------------------------------------

    async def usage(self, days: int, now: float | None = None) -> dict[str, Any]:
        """Tokens per UTC day, per user and per model over the last ``days`` days, from
        the sums kept as steps are written (tables ``usage`` and ``model_usage``)."""
        now = time.time() if now is None else now
        since_epoch = (int(now // 86400) - days + 1) * 86400
        since = utc_day(since_epoch)
        u, m = usage.c, model_usage.c
        prompt, completion = func.sum(u.prompt_tokens), func.sum(u.completion_tokens)
        per_day = await self._all(
            select(u.day, prompt.label("prompt"), completion.label("completion"))
            .where(u.day >= since)
            .group_by(u.day)
            .order_by(u.day)
        )
        tokens = (prompt + completion).label("tokens")
        per_user = await self._all(
            select(u.platform, u.user_id, tokens, func.sum(u.generations).label("generations"))
            .where(u.day >= since)
            .group_by(u.platform, u.user_id)
            .order_by(tokens.desc())
            .limit(20)
        )
        model_prompt, model_completion = func.sum(m.prompt_tokens), func.sum(m.completion_tokens)
        per_model = await self._all(
            select(
                m.model,
                model_prompt.label("prompt"),
                model_completion.label("completion"),
                func.sum(m.generations).label("generations"),
                func.sum(m.llm_seconds).label("llm"),
            )
            .where(m.day >= since)
            .group_by(m.model)
            .order_by((model_prompt + model_completion).desc())
        )
        return {
            "since": since_epoch,
            "per_day": per_day,
            "per_user": per_user,
            "per_model": per_model,
        }

    # -- health -----------------------------------------------------------------------------

    async def health(self, hours: int, now: float | None = None) -> dict[str, Any]:
        """Messages per minute, reply latency percentiles, errors, queues, over ``hours``."""
        now = time.time() if now is None else now
        since = now - hours * 3600
        bucket = _bucket_seconds(hours)
        s = steps.c
        slot = self._bucket(s.at, bucket).label("slot")
        counted = await self._all(
            select(slot, func.count().label("steps"))
            .where(s.at >= since)
            .where(s.trigger.in_(("message", "begin")))
            .where(s.replies > 0)  # (a chat-style template's first message: two steps)
            .group_by(slot)
            .order_by(slot)
        )
        timed = list(
            reversed(
                await self._all(
                    select(s.at, s.first_reply, s.llm)
                    .where(s.at >= since)
                    .where(s.first_reply.is_not(None))
                    .order_by(s.at.desc())
                    .limit(LATENCY_ROWS)
                )
            )
        )
        by_slot: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for r in timed:
            by_slot[int(r["at"] // bucket * bucket)].append((r["first_reply"], r["llm"]))
        latency = []
        for at, values in sorted(by_slot.items()):
            replies = sorted(v[0] for v in values)
            added = sorted(max(0.0, v[0] - v[1]) for v in values)
            latency.append(
                {
                    "at": at,
                    "p50": percentile(replies, 0.5),
                    "p90": percentile(replies, 0.9),
                    "p99": percentile(replies, 0.99),
                    "added_p50": percentile(added, 0.5),
                    "llm_p50": percentile(sorted(v[1] for v in values), 0.5),
                }
            )
        replies = sorted(r["first_reply"] for r in timed)
        llm = sorted(r["llm"] for r in timed)
        kinds = await self._all(
            select(errors.c.kind, func.count().label("count"))
            .where(errors.c.at >= since)
            .group_by(errors.c.kind)
            .order_by(func.count().desc())
        )
        recent_errors = await self._all(
            select(errors).where(errors.c.at >= since).order_by(errors.c.at.desc()).limit(20)
        )
        for error in recent_errors:
            error["channel"] = _channel_text(error["channel"]) if error["channel"] else ""
        gauges = await self._all(
            select(samples).where(samples.c.at >= since).order_by(samples.c.at).limit(20_000)
        )
        inbox_depth = await self._scalar(
            select(func.count()).select_from(inbox).where(inbox.c.consumed == false())
        )
        unsent = await self._scalar(
            select(func.count()).select_from(outbox).where(outbox.c.sent == false())
        )
        active = await self._all(
            select(conversations.c.status, func.count().label("count"))
            .where(conversations.c.status.in_(("running", "waiting")))
            .group_by(conversations.c.status)
        )
        return {
            "since": since,
            "bucket": bucket,
            "per_slot": [{"at": int(r["slot"]), "steps": r["steps"]} for r in counted],
            "latency": latency,
            "overall": {
                "count": len(replies),
                "p50": percentile(replies, 0.5),
                "p90": percentile(replies, 0.9),
                "p99": percentile(replies, 0.99),
                "llm_p50": percentile(llm, 0.5),
            },
            "errors": kinds,
            "recent_errors": recent_errors,
            "samples": gauges,
            "inbox": int(inbox_depth or 0),
            "unsent": int(unsent or 0),
            "active": {r["status"]: r["count"] for r in active},
        }


def _bucket_seconds(hours: int) -> int:
    """Plot points of a window: one a minute up to 2 hours, then coarser (≤ ~150)."""
    for seconds in (60, 300, 600, 1800, 3600, 21600):
        if hours * 3600 / seconds <= 150:
            return seconds
    return 86400


def _cursor(text: str) -> tuple[float, str] | None:
    at, _, last_id = text.partition(":")
    try:
        value = float(at)
    except ValueError:
        return None
    return (value, last_id) if last_id and math.isfinite(value) else None


def _channel_text(stored: str) -> str:
    """A stored channel key as the CLI shows it (``platform:channel[:thread=..]``)."""
    try:
        platform, channel, thread, user = _loads(stored)
    except (ValueError, TypeError):
        return stored
    parts = [str(platform), str(channel)]
    if thread is not None:
        parts.append(f"thread={thread}")
    if user is not None:
        parts.append(f"user={user}")
    return ":".join(parts)


def per_worker(rows: Iterable[dict[str, Any]], column: str) -> dict[str, list[tuple[float, float]]]:
    """Samples' ``column`` over time, per worker."""
    found: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        found[row["worker"]].append((row["at"], float(row[column])))
    return dict(found)
