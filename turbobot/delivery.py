"""Delivery: replies leave through here, and one that cannot leave now is kept and retried.

A reply is in the store's outbox before it is sent (see docs/architecture.md, "The
step and commit protocol"). :class:`Outbox` sends it; when the platform refuses for
a while (network down, 5xx, rate limits beyond the adapter's own handling) the reply
waits, with the channel's later replies behind it in order, and is tried again with
backoff, without a restart; when the platform will never take it
(:class:`~turbobot.exceptions.UndeliverableError`: the user blocked the bot) it is
dropped with a warning. Nothing here raises: one reply never stops a channel, and
start-up never waits on the platform.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from turbobot.chat import ChannelKey
from turbobot.clock import SystemClock, TimerHandle
from turbobot.exceptions import UndeliverableError
from turbobot.store import BaseStore, OutgoingRecord, StepWrite

if TYPE_CHECKING:
    from turbobot.runtime import BaseSender

__all__ = ["FAILED", "Outbox"]

_log = logging.getLogger(__name__)

#: what :meth:`Outbox.deliver` returns when the reply was kept to be sent later
FAILED: Any = object()


class Outbox:
    """Sends replies for a runtime; keeps those the platform refuses and retries them.

    Args:
        sender: the adapter.
        store: where a reply sent later is marked sent.
        retry_delays: seconds before each retry of a channel's kept replies; the last
            is repeated.
        call_later: makes the retry timers (the runtime's clock's: a test's
            :class:`~turbobot.clock.FakeClock` fires them without sleeping).
        wake: called with a channel when its kept replies are due (the runtime's
            worker then calls :meth:`resend` before anything else).
    """

    def __init__(
        self,
        sender: BaseSender,
        store: BaseStore,
        *,
        retry_delays: Sequence[float],
        wake: Callable[[ChannelKey], None],
        call_later: Callable[..., TimerHandle] | None = None,
    ) -> None:
        self.sender = sender
        self._call_later = call_later or SystemClock().call_later
        self.store = store
        self.retry_delays = tuple(retry_delays) or (1.0,)
        self._wake = wake
        self._kept: dict[ChannelKey, deque[OutgoingRecord]] = {}
        self._attempts: dict[ChannelKey, int] = {}
        self._timers: dict[ChannelKey, TimerHandle] = {}

    def keep(self, outgoing: OutgoingRecord) -> None:
        """Keep a recorded reply to be sent by the channel's worker, as soon as it runs."""
        first = outgoing.key not in self._kept
        self._kept.setdefault(outgoing.key, deque()).append(outgoing)
        if first:
            self._wake(outgoing.key)

    def has_kept(self, key: ChannelKey) -> bool:
        return key in self._kept

    async def deliver(self, outgoing: OutgoingRecord) -> Any:
        """Send a recorded reply now: its platform id, or :data:`FAILED` if it was kept.

        A reply never overtakes the channel's kept ones: it is kept behind them.
        """
        if outgoing.key in self._kept:
            self.keep(outgoing)
            return FAILED
        result = await self._attempt(outgoing.key, self._plain(outgoing))
        if result is FAILED:
            self._kept.setdefault(outgoing.key, deque()).append(outgoing)
            self._schedule(outgoing.key)
        return result

    async def attempt(self, key: ChannelKey, sending: Awaitable[str | None]) -> Any:
        """Send something that cannot be kept (a live stream): its id, or ``FAILED``."""
        return await self._attempt(key, lambda: sending)

    async def resend(self, key: ChannelKey) -> bool:
        """Send the channel's kept replies, in order. ``False``: some are still kept."""
        kept = self._kept.get(key)
        while kept:
            outgoing = kept[0]
            platform_id = await self._attempt(key, self._plain(outgoing))
            if platform_id is FAILED:
                self._schedule(key)
                return False
            kept.popleft()
            await self.store.write(StepWrite(sent=[(outgoing.id, platform_id)]))
        self._kept.pop(key, None)
        self._attempts.pop(key, None)
        return True

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _plain(self, outgoing: OutgoingRecord) -> Callable[[], Awaitable[str | None]]:
        return lambda: self.sender.send(outgoing.key, outgoing.text)

    async def _attempt(self, key: ChannelKey, sending: Callable[[], Awaitable[str | None]]) -> Any:
        try:
            return await sending()
        except UndeliverableError as exc:
            _log.warning("channel %s: the reply cannot be delivered, dropped: %s", key, exc)
            return None
        except Exception as exc:
            _log.warning(
                "channel %s: sending a reply failed (%s: %s); it is kept and sent again later",
                key,
                type(exc).__name__,
                exc,
            )
            return FAILED

    def _schedule(self, key: ChannelKey) -> None:
        if key in self._timers:
            return
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        delay = self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
        self._timers[key] = self._call_later(delay, self._due, key)

    def _due(self, key: ChannelKey) -> None:
        self._timers.pop(key, None)
        self._wake(key)
