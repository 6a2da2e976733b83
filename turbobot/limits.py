"""Abuse limits, the same on every platform: who may talk to the bot, and how fast.

- **Allowlists** (``Limits.users``, ``Limits.chats``): a message from anyone else is
  not stored and not answered, except for one notice per user per run, so that a
  flood costs neither storage nor replies.
- **A per-user rate** (``Limits.per_minute``, with a burst): a user's messages beyond
  it wait their turn, in order (type-ahead stays ordered, nothing is dropped), and the
  user is told once per slow-down. A token bucket per user, on the runtime's clock.
- **A token budget per user per day** (``Limits.tokens_per_day``): the tokens the
  model reported for a user's requests (``turbobot.store.TokenUsage``), counted per UTC
  day. A user who reached it is told so instead of answered until 00:00 UTC; commands
  that do not generate (``/usage``, ``/help``, ``/reset``, ``/cancel``) still work.
  The step that crosses the budget is finished, not cut short.

Ids are the platform's: a user id or a chat id as the adapter gives them
(``IncomingMessage.author_id``, ``ChannelKey.channel``), with or without the platform
in front (``"telegram:12345"`` matches only on Telegram, ``"12345"`` anywhere).
See docs/architecture.md, "Abuse limits".
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from turbobot.chat import IncomingMessage
from turbobot.store import TokenUsage, utc_day

__all__ = ["Limits", "RateLimiter", "TokenBudget", "duration", "parse_ids"]


def duration(seconds: float) -> str:
    """``seconds`` for people: ``"5 h 3 min"``, ``"12 min"``, ``"under a minute"``."""
    minutes = int(seconds // 60)
    if minutes < 1:
        return "under a minute"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


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
        guilds: the Discord servers (guild ids) the bot answers in (``None``: every
            one). Direct messages have no guild: the ``users`` list governs them.
        tokens_per_day: the tokens a user's requests may use per UTC day (``None``:
            no budget).
        admins: user ids that may ``/reset`` any conversation in a shared chat, besides
            the one who started it and the platform's own chat admins.
    """

    users: frozenset[str] | None = None
    chats: frozenset[str] | None = None
    per_minute: float | None = None
    burst: int | None = None
    guilds: frozenset[str] | None = None
    tokens_per_day: int | None = None
    admins: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.per_minute is not None and not self.per_minute > 0:
            raise ValueError(f"per_minute must be positive, got {self.per_minute!r}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")
        if self.tokens_per_day is not None and self.tokens_per_day < 1:
            raise ValueError(f"tokens_per_day must be at least 1, got {self.tokens_per_day!r}")

    def allows(self, message: IncomingMessage) -> bool:
        """Whether ``message`` may be stored and answered (the allowlists)."""
        platform = message.key.platform
        if self.users is not None and not _listed(self.users, platform, message.author_id):
            return False
        if self.chats is not None and not _listed(self.chats, platform, message.key.channel):
            return False
        guild = message.guild
        return self.guilds is None or guild is None or _listed(self.guilds, platform, guild)

    def is_admin(self, platform: str, user_id: str) -> bool:
        """Whether the operator named ``user_id`` an admin (``admins``)."""
        return bool(user_id) and _listed(self.admins, platform, user_id)


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


class TokenBudget:
    """What each user spent today, against ``Limits.tokens_per_day``.

    A user's day is read from the store the first time it is asked for (the store
    commits what was written before it reads), then counted in RAM from the steps
    written (``spend``). A step written while that first read runs may be missed, so a
    user can go over by one step's tokens at most; so can the step that crosses the
    budget, which is finished. With several processes on one database, each counts
    the steps it writes on top of what it read (see docs/architecture.md, "Abuse
    limits").
    """

    #: users remembered per day before the memory starts again from the store
    MAX_USERS = 100_000

    def __init__(
        self,
        per_day: int,
        read: Callable[[str, str, str], Awaitable[list[TokenUsage]]],
        clock: Callable[[], float],
    ) -> None:
        self.per_day = per_day
        self._read = read
        self._clock = clock
        self._day = ""
        #: (platform, user) -> tokens spent on ``_day``
        self._spent: dict[tuple[str, str], int] = {}

    def _today(self) -> str:
        day = utc_day(self._clock())
        if day != self._day:
            self._day = day
            self._spent.clear()
        return day

    async def spent(self, platform: str, user_id: str) -> int:
        """The tokens ``user_id`` used today (UTC)."""
        day = self._today()
        user = (platform, user_id)
        known = self._spent.get(user)
        if known is None:
            if len(self._spent) >= self.MAX_USERS:
                self._spent.clear()
            used = await self._read(platform, user_id, day)
            known = sum(row.tokens for row in used if row.day == day)
            if day == self._day:
                # Steps written during the read were added to an entry that was not
                # there yet: they are in what the store gave back, or missed (above).
                self._spent[user] = known
        return known

    def spend(self, used: TokenUsage) -> None:
        """Count a written step's tokens (for users already read today)."""
        user = (used.platform, used.user_id)
        if used.day == self._day and user in self._spent:
            self._spent[user] += used.tokens

    async def exhausted(self, platform: str, user_id: str) -> bool:
        return await self.spent(platform, user_id) >= self.per_day

    def renews_in(self) -> float:
        """Seconds until the budgets renew (00:00 UTC)."""
        return 86_400.0 - self._clock() % 86_400.0
