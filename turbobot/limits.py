"""Abuse limits, the same on every platform: who may talk to the bot, and how fast.

- **Allowlists** (``Limits.users``, ``Limits.chats``): a message from anyone else is
  not stored and not answered, except for one notice per user per run, so that a
  flood costs neither storage nor replies.
- **A per-user rate** (``Limits.per_minute``, with a burst): a user's messages beyond
  it wait their turn, in order (type-ahead stays ordered, nothing is dropped), and the
  user is told once per slow-down. A token bucket per user, on the runtime's clock.

Ids are the platform's: a user id or a chat id as the adapter gives them
(``IncomingMessage.author_id``, ``ChannelKey.channel``), with or without the platform
in front (``"telegram:12345"`` matches only on Telegram, ``"12345"`` anywhere).
See docs/architecture.md, "Abuse limits".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from turbobot.chat import IncomingMessage

__all__ = ["Limits", "RateLimiter", "parse_ids"]


def parse_ids(text: str) -> frozenset[str]:
    """Ids from a comma- or space-separated list (``"12, telegram:34"``)."""
    return frozenset(part for part in text.replace(",", " ").split() if part)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the runtime lets through.

    Args:
        users: the user ids allowed to talk to the bot (``None``: everyone).
        chats: the chat (channel) ids the bot answers in (``None``: every chat). With
            both, a message must pass both.
        per_minute: messages a user may send per minute before the rest wait (``None``:
            no limit).
        burst: how many messages a user may send at once before the rate applies
            (default: ``per_minute``, at least 1).
    """

    users: frozenset[str] | None = None
    chats: frozenset[str] | None = None
    per_minute: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.per_minute is not None and not self.per_minute > 0:
            raise ValueError(f"per_minute must be positive, got {self.per_minute!r}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")

    def allows(self, message: IncomingMessage) -> bool:
        """Whether ``message`` may be stored and answered (the allowlists)."""
        platform = message.key.platform
        if self.users is not None and not _listed(self.users, platform, message.author_id):
            return False
        return self.chats is None or _listed(self.chats, platform, message.key.channel)


def _listed(ids: frozenset[str], platform: str, value: str) -> bool:
    return value in ids or f"{platform}:{value}" in ids


class RateLimiter:
    """Token buckets per user: ``take`` says how long to wait before a message may go."""

    def __init__(self, per_minute: float, burst: int | None, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self._clock = clock
        #: user -> (tokens, when counted); users whose bucket refilled are forgotten
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, user: tuple[str, str]) -> float:
        """Take a token for ``user``: 0 if one was there, else the seconds until one is
        (nothing is taken then)."""
        now = self._clock()
        tokens, then = self._buckets.get(user, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            if tokens >= self.burst - 1e-9:
                self._buckets.pop(user, None)
            else:
                self._buckets[user] = (tokens, now)
            return 0.0
        self._buckets[user] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def prune(self) -> None:
        """Forget users whose buckets are full again (they cost nothing to recreate)."""
        now = self._clock()
        full = [
            user
            for user, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self.rate >= self.burst
        ]
        for user in full:
            del self._buckets[user]
