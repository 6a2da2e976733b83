"""Journal types: what a conversation's journal holds (docs/architecture.md, "Replay
and its rules").

Its own module so that stores, which keep journals, do not import the template engine
that writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["JOURNAL_KINDS", "JournalEntry"]

#: what a journal entry records, by the yield that received the value
JOURNAL_KINDS = frozenset(
    {"input", "timeout", "generate", "tool", "step", "error", "patch", "cancelled", "summary"}
)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One value sent into a template, with the chain hash of the structure before it.

    ``kind`` is one of :data:`JOURNAL_KINDS`; ``value`` is a JSON value (see
    turbobot.codec).
    """

    kind: str
    value: Any
    chain: str
