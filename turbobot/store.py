"""Where the runtime keeps inboxes, conversations, journals, transcripts and the outbox.

``BaseStore`` is the interface the runtime drives; ``InMemoryStore`` implements it in
RAM (tests, throwaway bots) and :class:`~turbobot.sql.SQLStore` in SQL.

The durability contract:

- :meth:`BaseStore.add_incoming` returns once the message is committed (or known to
  be a duplicate); :meth:`BaseStore.add_incoming_many` does the same for a batch,
  keeping its order.
- :meth:`BaseStore.write` queues one :class:`StepWrite`: everything one step of one
  conversation changed. A step is committed whole or not at all, and steps are
  committed in the order they were written.
- :meth:`BaseStore.flush` returns once every step written before it is committed.
  The runtime flushes before it sends a reply, so a reply never leaves before the
  input and the generation that produced it are durable.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Self

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.codec import round_trip
from turbobot.journal import JournalEntry

__all__ = [
    "FINAL_STATUSES",
    "BaseStore",
    "ChannelLeases",
    "ConversationRecord",
    "ConversationStatus",
    "ErrorRecord",
    "InMemoryStore",
    "InboxItem",
    "IncomingBatchError",
    "LeaseLostError",
    "OutgoingRecord",
    "Recovery",
    "Sample",
    "StepStats",
    "StepWrite",
    "TokenUsage",
    "TranscriptLine",
    "new_id",
    "utc_day",
]

#: ``running``: between inputs; ``waiting``: at a GetUserInput; the others are final
ConversationStatus = Literal[
    "running", "waiting", "finished", "reset", "restarted", "failed", "diverged"
]
FINAL_STATUSES = frozenset({"finished", "reset", "restarted", "failed", "diverged"})

_counter = itertools.count()
#: records of each kind an InMemoryStore keeps
_RECORDS = 10_000


_RANDOM = os.urandom(4).hex()


def utc_day(epoch: float) -> str:
    """The UTC day of ``epoch`` as ``YYYY-MM-DD`` (token budgets renew at 00:00 UTC)."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def new_id() -> str:
    """A unique, time-ordered id, safe across processes sharing a database.

    Nanoseconds, then this process's random tag, then a per-process counter.
    """
    return f"{time.time_ns():016x}{_RANDOM}{next(_counter) & 0xFFFFFF:06x}"


@dataclass(slots=True)
class ConversationRecord:
    """One run of a template in one channel."""

    id: str
    key: ChannelKey
    template_ref: str
    context: dict[str, Any]
    status: ConversationStatus = "running"
    journal: list[JournalEntry] = field(default_factory=list)
    #: yields handled when the conversation last stopped (see ``App.replay_until``)
    yields: int = 0
    #: absolute time (epoch seconds) at which the current GetUserInput times out
    deadline: float | None = None
    #: the last generation failed and must be retried on the next message
    broken: bool = False
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None

    @property
    def active(self) -> bool:
        return self.status not in FINAL_STATUSES

    def snapshot(self) -> ConversationRecord:
        """A plain copy of the state columns (the journal is written separately)."""
        return ConversationRecord.copy_of(self, journal=[])

    @classmethod
    def copy_of(cls, record: ConversationRecord, **changes: Any) -> Self:
        """A ``cls`` (this class or a subclass) with ``record``'s fields, then ``changes``."""
        values = {name: getattr(record, name) for name in _RECORD_FIELDS}
        values.update(changes)
        return cls(**values)


_RECORD_FIELDS = tuple(f.name for f in fields(ConversationRecord))


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """A line of a conversation as the user saw it."""

    conversation_id: str
    role: str
    text: str
    at: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: a user's line that is an inbox message: that message's id (a store may keep the
    #: text once, with the message)
    message_id: str | None = None
    #: an assistant's line: the outbox id of the reply that showed it
    reply_id: str | None = None
    #: shown while it was generated (``Generate(stream=True)``)
    streamed: bool = False


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens the model reported for one user's requests on one UTC day.

    Counted from the generations a step journaled (tool rounds, summaries and
    ``Generate(forward=False)`` included), when the step is written; a generation
    interrupted by a crash before its step was written is not counted.
    """

    platform: str
    user_id: str
    #: ``YYYY-MM-DD``, UTC (see :func:`utc_day`)
    day: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: model calls made (those whose server reported no usage included)
    generations: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return replace(
            self,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            generations=self.generations + other.generations,
        )


@dataclass(slots=True)
class StepStats:
    """What one step cost and how long the user waited, for the operator's page and
    the metrics (docs/architecture.md, "Operator's view"). Times are on the runtime's
    clock: ``at`` is when the step began; durations are seconds."""

    conversation_id: str
    key: ChannelKey
    #: the user whose input began the step (else the one who began the conversation)
    user_id: str | None
    #: ``begin`` (a message began the conversation), ``message``, ``timeout`` (a
    #: GetUserInput's deadline), ``replay`` (rebuilt from the journal) or ``resume``
    trigger: str
    at: float
    #: when the input arrived in this process (``None``: before a restart, or elsewhere)
    arrived: float | None = None
    #: when the first byte of a reply was handed to the adapter
    first_reply_at: float | None = None
    llm_seconds: float = 0.0
    duration: float = 0.0
    #: the model of the step's last model call
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    generations: int = 0
    replies: int = 0
    #: the kind of error that ended the step abnormally (an :class:`ErrorRecord` too)
    error: str | None = None

    @property
    def waited(self) -> float | None:
        return None if self.arrived is None else max(0.0, self.at - self.arrived)

    @property
    def first_reply(self) -> float | None:
        """Seconds from the input's arrival to the first reply byte."""
        if self.arrived is None or self.first_reply_at is None:
            return None
        return max(0.0, self.first_reply_at - self.arrived)


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """An error worth an operator's look (kinds: ``llm:<ErrorType>``, ``template``,
    ``diverged``, ``refused``, ``send``, ``undeliverable``). ``detail`` is one line and
    never holds a secret: an exception's type and first line."""

    at: float
    kind: str
    detail: str
    key: ChannelKey | None = None
    conversation_id: str | None = None
    reply_id: str | None = None


@dataclass(frozen=True, slots=True)
class Sample:
    """A worker's gauges at one moment (written once a minute, for the health plots)."""

    at: float
    worker: str
    live: int
    #: inputs received and not yet handled, in this process's RAM queues
    queued: int
    #: since the process started
    evictions: int
    replays: int


@dataclass(slots=True)
class OutgoingRecord:
    """A reply recorded before it is sent; ``platform_id`` is set once it was sent."""

    id: str
    key: ChannelKey
    text: str
    created_at: float = field(default_factory=time.time)
    platform_id: str | None = None
    sent: bool = False


@dataclass(frozen=True, slots=True)
class InboxItem:
    """A committed incoming message; ``seq`` orders a channel's inbox."""

    seq: int
    message: IncomingMessage


@dataclass(slots=True)
class StepWrite:
    """Everything one step of one conversation changed, committed atomically."""

    #: the conversation's state after the step (``None`` when there is none)
    record: ConversationRecord | None = None
    new_conversation: bool = False
    #: journal entries added, with the journal position of the first one
    journal: list[JournalEntry] = field(default_factory=list)
    journal_start: int = 0
    #: the journal is cut back to ``journal_start`` first (``/retry``)
    rewind: bool = False
    #: inbox messages used up by the step
    consumed: list[tuple[ChannelKey, str]] = field(default_factory=list)
    transcript: list[TranscriptLine] = field(default_factory=list)
    outgoing: list[OutgoingRecord] = field(default_factory=list)
    #: replies that were sent: (outgoing id, platform id)
    sent: list[tuple[str, str | None]] = field(default_factory=list)
    #: tokens the step's generations used, added to the user's day
    usage: list[TokenUsage] = field(default_factory=list)
    #: the timings of steps that ended, and errors met (stored where a store keeps them)
    stats: list[StepStats] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


@dataclass(slots=True)
class Recovery:
    """What a runtime needs after a (re)start."""

    #: messages committed but not used up, in arrival order
    inbox: list[InboxItem]
    #: keys of channels with an active conversation
    active: set[ChannelKey]
    #: active conversations waiting with a deadline: (key, deadline)
    deadlines: list[tuple[ChannelKey, float]]
    #: replies recorded but not marked sent, oldest first
    unsent: list[OutgoingRecord]
    #: active conversations stopped in the middle of a step (not waiting for input), except
    #: those whose generation failed: they wait for the channel's next message
    running: list[ChannelKey] = field(default_factory=list)
    #: channels with an active conversation of another template
    others: set[ChannelKey] = field(default_factory=set)


class IncomingBatchError(Exception):
    """Committing a batch of incoming messages failed part of the way.

    ``seqs`` says, per message, what was committed anyway (``None``: not committed or
    seen before); ``failed`` holds the positions of those that could not be committed
    (all the ``None`` ones when the store cannot tell); the cause is the exception's
    ``__cause__``.
    """

    def __init__(self, seqs: list[int | None], failed: Sequence[int] | None = None) -> None:
        super().__init__("some incoming messages could not be committed")
        self.seqs = seqs
        self.failed = (
            list(failed) if failed is not None else [i for i, s in enumerate(seqs) if s is None]
        )


class LeaseLostError(Exception):
    """This worker no longer holds the channel's lease: another worker took it (see
    :class:`ChannelLeases`). What it did for the channel since is not committed."""


class ChannelLeases(ABC):
    """Which channels this worker may process, while several workers share one store.

    A store without leases (``BaseStore.leases is None``) belongs to one process, which
    processes every channel. With them, a worker processes a channel only while it
    holds the channel's lease; the store refuses a step written for a channel whose
    lease was lost or taken since (fencing). See docs/architecture.md, "Scale-out".
    """

    #: seconds a lease lasts unless renewed
    ttl: float

    @abstractmethod
    def holds(self, key: ChannelKey) -> bool:
        """Whether this worker holds the channel's lease, as far as it knows (the
        commit of each step checks it again on the store's side)."""

    @abstractmethod
    def held(self) -> list[ChannelKey]:
        """The channels whose lease this worker holds."""

    def fresh(self) -> bool:
        """Whether the leases held are surely still valid by the local clock (if not,
        :meth:`confirm` asks the store)."""
        return True

    @abstractmethod
    async def confirm(self, key: ChannelKey) -> bool:
        """Whether this worker still holds the channel, asked of the store (before
        something is sent that no commit checks: a reply kept for a retry)."""

    @abstractmethod
    async def claim(self, keys: Sequence[ChannelKey]) -> list[ChannelKey]:
        """Take the leases of those channels no other worker holds: the ones taken.

        A channel taken may have been processed elsewhere since this worker last saw
        it: its state must be read again from the store.
        """

    @abstractmethod
    async def renew(self) -> list[ChannelKey]:
        """Extend the leases held: the channels whose lease turned out to be lost."""

    @abstractmethod
    async def release(self, keys: Sequence[ChannelKey]) -> None:
        """Give the leases up (another worker may take the channels at once)."""

    @abstractmethod
    async def orphans(self, due: float, refs: Sequence[str], limit: int) -> list[ChannelKey]:
        """Channels with work no worker holds: unused inbox messages, unsent replies,
        conversations of those templates stopped mid-step or with a deadline before
        ``due`` (epoch seconds)."""

    @abstractmethod
    async def unread(self) -> list[ChannelKey]:
        """Channels this worker holds that have unused inbox messages (a safety net for
        notifications that were missed)."""

    @abstractmethod
    def subscribe(self, callback: Callable[[list[ChannelKey] | None], None]) -> None:
        """Call ``callback`` with the channels another worker committed messages for;
        with ``None`` when notifications may have been missed (read the store)."""


class BaseStore(ABC):
    """The runtime's persistence interface (see the module docstring for the contract)."""

    #: channel leases, when several workers share this store (``None``: this process
    #: processes every channel)
    leases: ChannelLeases | None = None
    #: told each commit's size (operations) and seconds, if the store groups commits
    #: (the metrics; see turbobot.metrics)
    on_commit: Callable[[int, float], None] | None = None

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the store (create or upgrade the schema, start writers)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Commit what is pending and release resources."""

    async def __aenter__(self) -> BaseStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @abstractmethod
    async def add_incoming(self, message: IncomingMessage) -> int | None:
        """Commit ``message`` to its channel's inbox: its seq, or ``None`` if seen before."""

    async def add_incoming_many(self, messages: Sequence[IncomingMessage]) -> list[int | None]:
        """Commit several messages, in order: their seqs (``None`` for those seen before).

        Raises :class:`IncomingBatchError` if some were committed and another failed.
        """
        # Each call queues its message before its first await, so the order holds.
        results = await asyncio.gather(
            *(self.add_incoming(m) for m in messages), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            seqs = [None if isinstance(r, BaseException) else r for r in results]
            failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
            raise IncomingBatchError(seqs, failed) from errors[0]
        return results  # type: ignore[return-value]  # no exceptions among them

    async def inbox(self, key: ChannelKey) -> list[InboxItem]:
        """The channel's committed, unused messages in order (stores may do it cheaper)."""
        return [item for item in (await self.recovery()).inbox if item.message.key == key]

    @abstractmethod
    async def write(self, step: StepWrite) -> None:
        """Queue ``step`` to be committed atomically, after every step written before."""

    @abstractmethod
    async def flush(self) -> None:
        """Return once every step written so far is committed."""

    @abstractmethod
    async def load_conversation(
        self, key: ChannelKey, template_ref: str | None = None
    ) -> ConversationRecord | None:
        """The channel's active conversation (of that template) with its journal, if any.

        A conversation belongs to its template: several bots may hold one each on the
        same channel (see docs/architecture.md, "Conversations").
        """

    @abstractmethod
    async def recovery(
        self, template_ref: str | None = None, keys: Sequence[ChannelKey] | None = None
    ) -> Recovery:
        """The state a starting runtime of that template resumes from (of the channels
        ``keys`` only: a worker taking channels over)."""

    @abstractmethod
    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        """Every conversation (of ``key``), oldest first, without journals."""

    @abstractmethod
    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        """Every transcript line of the channel, across its conversations, in order."""

    @abstractmethod
    async def usage(self, platform: str, user_id: str, since: str) -> list[TokenUsage]:
        """The user's token use per UTC day, from day ``since`` (``YYYY-MM-DD``) on,
        oldest first; days without use are left out."""


class InMemoryStore(BaseStore):
    """A store in RAM: nothing survives the process. Steps apply at once.

    Journal values go through the same JSON encoding as in SQL (turbobot.codec), so a
    test on this store sees what a replay from SQL would give back.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[ChannelKey, str]] = set()
        self._seq = itertools.count(1)
        self._inbox: dict[tuple[ChannelKey, str], InboxItem] = {}
        self._conversations: dict[str, ConversationRecord] = {}
        self._journals: dict[str, list[JournalEntry]] = {}
        #: (channel, template) → the active conversation's id
        self._active: dict[tuple[ChannelKey, str], str] = {}
        self._transcript: dict[ChannelKey, list[TranscriptLine]] = {}
        self._outbox: dict[str, OutgoingRecord] = {}
        self._usage: dict[tuple[str, str, str], TokenUsage] = {}
        #: the operator's records, the newest ``_RECORDS`` of each (for tests)
        self.stats: deque[StepStats] = deque(maxlen=_RECORDS)
        self.errors: deque[ErrorRecord] = deque(maxlen=_RECORDS)
        self.samples: deque[Sample] = deque(maxlen=_RECORDS)

    async def add_incoming(self, message: IncomingMessage) -> int | None:
        seen = (message.key, message.message_id)
        if seen in self._seen:
            return None
        self._seen.add(seen)
        item = InboxItem(next(self._seq), message)
        self._inbox[seen] = item
        return item.seq

    async def write(self, step: StepWrite) -> None:
        record = step.record
        if record is not None:
            state = record.snapshot()
            previous = self._conversations.get(record.id)
            if previous is not None:
                state.context = previous.context  # written once, with the new conversation
            self._conversations[record.id] = state
            journal = self._journals.setdefault(record.id, [])
            if step.rewind:
                del journal[step.journal_start :]
            if step.journal:
                del journal[step.journal_start :]
                # Through the SQL stores' encoding: what would not come back from SQL
                # unchanged does not come back unchanged from here either.
                journal.extend(
                    JournalEntry(e.kind, round_trip(e.value), e.chain) for e in step.journal
                )
            owner = (record.key, state.template_ref)
            if state.active:
                self._active[owner] = record.id
            elif self._active.get(owner) == record.id:
                del self._active[owner]
        for consumed in step.consumed:
            self._inbox.pop(consumed, None)
        if record is not None and step.transcript:
            self._transcript.setdefault(record.key, []).extend(step.transcript)
        for outgoing in step.outgoing:
            self._outbox[outgoing.id] = replace(outgoing)
        for outgoing_id, _platform_id in step.sent:
            self._outbox.pop(outgoing_id, None)
        for used in step.usage:
            day = (used.platform, used.user_id, used.day)
            known = self._usage.get(day)
            self._usage[day] = used if known is None else known + used
        self.stats.extend(step.stats)
        self.errors.extend(step.errors)
        self.samples.extend(step.samples)

    async def flush(self) -> None:
        return None

    async def load_conversation(
        self, key: ChannelKey, template_ref: str | None = None
    ) -> ConversationRecord | None:
        if template_ref is not None:  # the runtime's case, once per message: a lookup
            found = self._active.get((key, template_ref))
        else:  # without a template (tools, tests): the newest, ids are time-ordered
            found = max(
                (cid for (channel, _), cid in self._active.items() if channel == key),
                default=None,
            )
        if found is None:
            return None
        conversation_id = found
        record = replace(self._conversations[conversation_id])
        record.journal = list(self._journals.get(conversation_id, ()))
        return record

    async def inbox(self, key: ChannelKey) -> list[InboxItem]:
        return sorted(
            (item for (k, _), item in self._inbox.items() if k == key), key=lambda i: i.seq
        )

    async def recovery(
        self, template_ref: str | None = None, keys: Sequence[ChannelKey] | None = None
    ) -> Recovery:
        only = None if keys is None else set(keys)
        inbox = sorted(
            (item for item in self._inbox.values() if only is None or item.message.key in only),
            key=lambda item: item.seq,
        )
        mine: dict[ChannelKey, ConversationRecord] = {}
        others: set[ChannelKey] = set()
        for (key, ref), cid in self._active.items():
            if only is not None and key not in only:
                continue
            if template_ref in (None, ref):
                mine[key] = self._conversations[cid]
            else:
                others.add(key)
        deadlines = [
            (key, record.deadline)
            for key, record in mine.items()
            if record.status == "waiting" and record.deadline is not None
        ]
        unsent = sorted(
            (o for o in self._outbox.values() if only is None or o.key in only),
            key=lambda o: o.id,
        )
        running = [
            key for key, record in mine.items() if record.status == "running" and not record.broken
        ]
        return Recovery(inbox, set(mine), deadlines, unsent, running, others)

    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        records = [replace(r) for r in self._conversations.values() if key is None or r.key == key]
        return sorted(records, key=lambda r: r.id)

    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        return list(self._transcript.get(key, ()))

    async def usage(self, platform: str, user_id: str, since: str) -> list[TokenUsage]:
        return sorted(
            (
                used
                for (p, u, day), used in self._usage.items()
                if p == platform and u == user_id and day >= since
            ),
            key=lambda used: used.day,
        )
