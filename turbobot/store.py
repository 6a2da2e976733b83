"""Where the runtime keeps channels' inboxes, conversations, journals, transcripts and outbox.

``BaseStore`` is the interface the runtime drives; ``InMemoryStore`` implements it
in RAM (tests, the console). The durable SQL store implements the same interface.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.template import JournalEntry

__all__ = [
    "BaseStore",
    "ConversationRecord",
    "ConversationStatus",
    "InMemoryStore",
    "OutgoingRecord",
    "TranscriptLine",
]

#: ``running``: between inputs; ``waiting``: at a GetUserInput; the others are final
ConversationStatus = Literal[
    "running", "waiting", "finished", "reset", "restarted", "failed", "diverged"
]
FINAL_STATUSES = frozenset({"finished", "reset", "restarted", "failed", "diverged"})


@dataclass(slots=True)
class ConversationRecord:
    """One run of a template in one channel."""

    id: int
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


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    """A line of a conversation as the user saw it."""

    conversation_id: int
    role: str
    text: str
    at: float


@dataclass(slots=True)
class OutgoingRecord:
    """A reply recorded before it is sent; ``platform_id`` is set once it was sent."""

    id: int
    key: ChannelKey
    text: str
    platform_id: str | None = None
    sent: bool = False


class BaseStore(ABC):
    """The runtime's persistence interface. Every method is awaited under the channel's lock."""

    # inbox
    @abstractmethod
    async def add_incoming(self, message: IncomingMessage) -> bool:
        """Commit ``message`` to its channel's inbox; ``False`` if its id was seen before."""

    @abstractmethod
    async def pending(self, key: ChannelKey) -> list[IncomingMessage]:
        """Messages of ``key`` not yet consumed, in arrival order."""

    @abstractmethod
    async def consume(self, key: ChannelKey, message_id: str) -> None:
        """Mark a message as handled."""

    # conversations
    @abstractmethod
    async def active_conversation(self, key: ChannelKey) -> ConversationRecord | None:
        """The channel's conversation that has not ended, if any."""

    @abstractmethod
    async def create_conversation(
        self, key: ChannelKey, template_ref: str, context: dict[str, Any]
    ) -> ConversationRecord:
        """Start a new conversation record for ``key``."""

    @abstractmethod
    async def save_conversation(
        self, record: ConversationRecord, new_entries: Sequence[JournalEntry]
    ) -> None:
        """Persist the record's state and append ``new_entries`` to its journal."""

    @abstractmethod
    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        """Every conversation (of ``key``), oldest first."""

    # transcript and outbox
    @abstractmethod
    async def add_transcript(self, record: ConversationRecord, role: str, text: str) -> None:
        """Append a line to the conversation's transcript."""

    @abstractmethod
    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        """Every transcript line of the channel, across its conversations."""

    @abstractmethod
    async def add_outgoing(self, key: ChannelKey, text: str) -> OutgoingRecord:
        """Record a reply before sending it."""

    @abstractmethod
    async def mark_sent(self, outgoing: OutgoingRecord, platform_id: str | None) -> None:
        """Mark a recorded reply as sent."""

    @abstractmethod
    async def unsent(self) -> list[OutgoingRecord]:
        """Replies recorded but never marked sent."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


class InMemoryStore(BaseStore):
    """A store in RAM: nothing survives the process."""

    def __init__(self) -> None:
        self._seen: set[tuple[ChannelKey, str]] = set()
        self._inbox: dict[ChannelKey, list[IncomingMessage]] = {}
        self._conversations: list[ConversationRecord] = []
        self._active: dict[ChannelKey, ConversationRecord] = {}
        self._transcript: dict[ChannelKey, list[TranscriptLine]] = {}
        self._outbox: dict[int, OutgoingRecord] = {}
        self._ids = itertools.count(1)

    async def add_incoming(self, message: IncomingMessage) -> bool:
        seen = (message.key, message.message_id)
        if seen in self._seen:
            return False
        self._seen.add(seen)
        self._inbox.setdefault(message.key, []).append(message)
        return True

    async def pending(self, key: ChannelKey) -> list[IncomingMessage]:
        return list(self._inbox.get(key, ()))

    async def consume(self, key: ChannelKey, message_id: str) -> None:
        box = self._inbox.get(key, [])
        self._inbox[key] = [m for m in box if m.message_id != message_id]
        if not self._inbox[key]:
            del self._inbox[key]

    async def active_conversation(self, key: ChannelKey) -> ConversationRecord | None:
        record = self._active.get(key)
        return record if record is not None and record.active else None

    async def create_conversation(
        self, key: ChannelKey, template_ref: str, context: dict[str, Any]
    ) -> ConversationRecord:
        record = ConversationRecord(next(self._ids), key, template_ref, context)
        self._conversations.append(record)
        self._active[key] = record
        return record

    async def save_conversation(
        self, record: ConversationRecord, new_entries: Sequence[JournalEntry]
    ) -> None:
        # The runtime hands over the record it holds; the journal list is the same object.
        if not record.active:
            record.ended_at = record.ended_at or time.time()
            if self._active.get(record.key) is record:
                del self._active[record.key]

    async def conversations(self, key: ChannelKey | None = None) -> list[ConversationRecord]:
        return [c for c in self._conversations if key is None or c.key == key]

    async def add_transcript(self, record: ConversationRecord, role: str, text: str) -> None:
        line = TranscriptLine(record.id, role, text, time.time())
        self._transcript.setdefault(record.key, []).append(line)

    async def transcript(self, key: ChannelKey) -> list[TranscriptLine]:
        return list(self._transcript.get(key, ()))

    async def add_outgoing(self, key: ChannelKey, text: str) -> OutgoingRecord:
        record = OutgoingRecord(next(self._ids), key, text)
        self._outbox[record.id] = record
        return record

    async def mark_sent(self, outgoing: OutgoingRecord, platform_id: str | None) -> None:
        outgoing.platform_id = platform_id
        outgoing.sent = True
        self._outbox.pop(outgoing.id, None)

    async def unsent(self) -> list[OutgoingRecord]:
        return [o for o in self._outbox.values() if not o.sent]
