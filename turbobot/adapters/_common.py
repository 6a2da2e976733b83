"""What the platform adapters share: keeping secrets out of logs, reporting sent ids."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, Self

from turbobot.runtime import BaseSender, Runtime

if TYPE_CHECKING:
    from turbobot.platforms import Launch

__all__ = ["RateLimiter", "RedactSecrets", "guard_logs", "platform_id", "serve"]


class RedactSecrets(logging.Filter):
    """Replaces the given secrets wherever a log record shows them (message and traceback).

    ``patterns`` find secrets not known in advance (a Discord interaction's token): the
    text each one's first group matches is replaced.
    """

    def __init__(self, *secrets: str, patterns: Iterable[re.Pattern[str]] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.patterns = list(patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: the handler reports it, not us
            return True
        redacted = self.redacted(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text: a traceback is redacted once, here.
            record.exc_text = self.redacted(logging.Formatter().formatException(record.exc_info))
        return True

    def redacted(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "<redacted>")
        for pattern in self.patterns:
            text = pattern.sub(_redact_group, text)
        return text


def _redact_group(match: re.Match[str]) -> str:
    start, end = match.span(1)
    whole = match.group(0)
    offset = match.start(0)
    return whole[: start - offset] + "<redacted>" + whole[end - offset :]


def guard_logs(redact: logging.Filter, *, quiet: Iterable[str] = ()) -> None:
    """Put ``redact`` on the root logger's handlers; raise ``quiet`` loggers to WARNING
    (libraries that log request URLs holding a token at INFO)."""
    for name in quiet:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    for handler in logging.getLogger().handlers:
        if redact not in handler.filters:
            handler.addFilter(redact)


def platform_id(ids: list[str]) -> str | None:
    """The ids of a reply's messages as one value for the outbox (at most 128 characters)."""
    if not ids:
        return None
    joined = ",".join(ids)
    return joined if len(joined) <= 128 else f"{ids[0]}..{ids[-1]}"


class RateLimiter:
    """A token bucket: ``rate`` acquisitions a second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def try_acquire(self) -> bool:
        """Take a token only if one is free now (for requests that may be skipped)."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self) -> None:
        self._refill()
        self._tokens -= 1  # a reservation: later callers wait behind it
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class _Adapter(Protocol):
    username: str | None

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    async def run(self, runtime: Runtime) -> None: ...


async def serve(launch: Launch, adapter: _Adapter, shown_as: str) -> None:
    """Run ``adapter`` with the bot's parts until it stops: the adapter connects first
    (a wrong token fails before the database is opened), and closes last (replies of
    the steps in flight still go out while the runtime closes). ``shown_as`` names the
    bot on start (``{username}`` is replaced once connected)."""
    assert isinstance(adapter, BaseSender)
    async with adapter, launch.parts() as (template, store, llm):
        settings = dataclasses.replace(launch.settings, bot_username=adapter.username)
        async with Runtime(
            template,
            llm=llm,
            sender=adapter,
            store=store,
            settings=settings,
            modes=launch.modes,
            metrics=launch.metrics,
        ) as runtime:
            running = asyncio.create_task(adapter.run(runtime))
            ready = getattr(adapter, "wait_until_ready", None)
            if ready is not None:  # "running" only once connected (Discord's gateway)
                waiter = asyncio.ensure_future(ready())
                await asyncio.wait([running, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            if not running.done():
                name = shown_as.replace("{username}", adapter.username or "the bot")
                print(f"turbobot: {name} is running; Ctrl-C stops it", file=sys.stderr)
            await running
