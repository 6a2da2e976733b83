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
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.clock import SystemClock, TimerHandle
from turbobot.exceptions import UndeliverableError
from turbobot.metrics import Metrics, error_detail
from turbobot.store import BaseStore, ErrorRecord, OutgoingRecord, StepWrite

if TYPE_CHECKING:
    from turbobot.template import AssistantStream

__all__ = [
    "FAILED",
    "UNDELIVERABLE",
    "BaseSender",
    "Outbox",
    "answering",
    "delivering",
    "reached",
    "stored_id",
]

_log = logging.getLogger(__name__)

#: The incoming message the step now running answers, for a sender to reply to it (or
#: to answer the slash command it was). ``None`` when no message asked for what is sent:
#: a timeout, a kept reply sent again later, a step finished after a restart.
answering: ContextVar[IncomingMessage | None] = ContextVar("turbobot_answering", default=None)
#: while a reply is sent (``BaseSender.send``, ``send_stream``): its outbox id, the same
#: when the reply is sent again after a failure or a restart. An adapter whose platform
#: drops a message it already has under a key (Discord's nonce) derives that key from
#: it, so a reply sent twice is shown once. ``None`` for a notice that is stored nowhere.
delivering: ContextVar[str | None] = ContextVar("turbobot_delivering", default=None)


class BaseSender(ABC):
    """How the runtime talks back: an adapter implements this for its platform."""

    @abstractmethod
    async def send(self, key: ChannelKey, text: str) -> str | None:
        """Send ``text`` to the channel; return the platform's message id if any."""

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        """Show a reply while it is generated. The default waits and sends it whole.

        If the generation breaks off (``stream.interrupted``), a sender that showed
        part of it marks that part as interrupted (ending it with
        :data:`~turbobot.template.INTERRUPTED`) and returns its id, or takes it away
        and returns ``None``; the runtime records in the transcript what it says was
        shown. The default shows nothing of it.
        """
        async for _ in stream:
            pass
        if stream.message is None or not stream.text:
            return None
        return await self.send(key, stream.text)

    async def typing(self, key: ChannelKey) -> None:  # noqa: B027 - optional hook
        """Show that the bot is working (called every few seconds while it is)."""

    async def is_admin(self, key: ChannelKey, user_id: str) -> bool:
        """Whether ``user_id`` administers the chat ``key`` is in (may ``/reset`` the
        conversation someone else started there). The default: no one is."""
        return False

    async def handled(self, message: IncomingMessage) -> None:  # noqa: B027 - optional hook
        """``message`` is dealt with: every reply it asked for was sent (or kept).

        A sender that acknowledged it on the platform (a slash command's "thinking…")
        and has not answered it yet takes the acknowledgement away here.
        """


#: what :meth:`Outbox.deliver` returns when the reply was kept to be sent later
FAILED: Any = object()
#: what a send returns when the platform will never take the reply (the user blocked
#: the bot): it is dropped, and marked sent with no platform id (see ``stored_id``)
UNDELIVERABLE: Any = object()


def stored_id(result: Any) -> str | None:
    """The platform id to store for a send's result (none for an undeliverable reply)."""
    return None if result is UNDELIVERABLE else result


def reached(result: Any) -> bool:
    """Whether a send's result means the platform took the reply."""
    return result is not FAILED and result is not UNDELIVERABLE


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
        clock, metrics: failures are recorded for the operator (``errors``) and
            counted, with the replies sent (see turbobot.metrics).
    """

    def __init__(
        self,
        sender: BaseSender,
        store: BaseStore,
        *,
        retry_delays: Sequence[float],
        wake: Callable[[ChannelKey], None],
        call_later: Callable[..., TimerHandle] | None = None,
        clock: Callable[[], float] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.sender = sender
        self.clock = clock or time.time
        self.metrics = metrics
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

    def forget(self, key: ChannelKey) -> None:
        """Drop the channel's kept replies (another worker sends them: they are stored)."""
        self._kept.pop(key, None)
        self._attempts.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def has_kept(self, key: ChannelKey) -> bool:
        return key in self._kept

    async def deliver(self, outgoing: OutgoingRecord) -> Any:
        """Send a recorded reply now: its platform id, :data:`FAILED` if it was kept,
        or :data:`UNDELIVERABLE` if it was dropped.

        A reply never overtakes the channel's kept ones: it is kept behind them.
        """
        if outgoing.key in self._kept:
            self.keep(outgoing)
            return FAILED
        result = await self._attempt(outgoing.key, self._plain(outgoing), outgoing.id)
        if result is FAILED:
            self._kept.setdefault(outgoing.key, deque()).append(outgoing)
            self._schedule(outgoing.key)
        return result

    async def attempt(self, key: ChannelKey, sending: Awaitable[str | None]) -> Any:
        """Send something that cannot be kept (a live stream): its id, or ``FAILED``.
        (Not counted as a reply sent: the caller knows whether it was one.)"""
        return await self._attempt(key, lambda: sending, counted=False)

    async def resend(self, key: ChannelKey) -> bool:
        """Send the channel's kept replies, in order. ``False``: some are still kept."""
        kept = self._kept.get(key)
        while kept:
            outgoing = kept[0]
            platform_id = await self._attempt(key, self._plain(outgoing), outgoing.id)
            if platform_id is FAILED:
                self._schedule(key)
                return False
            kept.popleft()
            await self.store.write(StepWrite(sent=[(outgoing.id, stored_id(platform_id))]))
        self._kept.pop(key, None)
        self._attempts.pop(key, None)
        return True

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _plain(self, outgoing: OutgoingRecord) -> Callable[[], Awaitable[str | None]]:
        async def send() -> str | None:
            token = delivering.set(outgoing.id)
            try:
                return await self.sender.send(outgoing.key, outgoing.text)
            finally:
                delivering.reset(token)

        return send

    async def _attempt(
        self,
        key: ChannelKey,
        sending: Callable[[], Awaitable[str | None]],
        reply_id: str | None = None,
        *,
        counted: bool = True,
    ) -> Any:
        try:
            platform_id = await sending()
        except UndeliverableError as exc:
            _log.warning("channel %s: the reply cannot be delivered, dropped: %s", key, exc)
            await self._failed(key, "undeliverable", exc, reply_id)
            return UNDELIVERABLE
        except Exception as exc:
            _log.warning(
                "channel %s: sending a reply failed (%s: %s); it is kept and sent again later",
                key,
                type(exc).__name__,
                exc,
            )
            await self._failed(key, "send", exc, reply_id)
            return FAILED
        if counted and self.metrics is not None:
            self.metrics.replies.labels(key.platform).inc()
        return platform_id

    async def _failed(
        self, key: ChannelKey, kind: str, exc: BaseException, reply_id: str | None
    ) -> None:
        """Record a failed send for the operator (never raises: it is only a record)."""
        try:
            error = ErrorRecord(
                self.clock(), kind, error_detail(exc), key, reply_id=reply_id or delivering.get()
            )
            if self.metrics is not None:
                self.metrics.error(error)
            await self.store.write(StepWrite(errors=[error]))
        except Exception as failure:  # (a closed store: the log line above stays)
            _log.debug("channel %s: the failed send was not recorded: %s", key, failure)

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
