"""The test kit for bot authors: talk to a template through the real runtime.

:class:`BotSession` (async) and :class:`BotTester` (the same, for plain ``def`` tests:
it runs its own event loop, so it needs no pytest plugin or configuration) drive a
template as a platform adapter would, with a :class:`~turbobot.ScriptedLLM` (or any
LLM), an in-memory store kept across :meth:`~BotSession.restart`, and a
:class:`~turbobot.clock.FakeClock` so that ``GetUserInput(timeout=...)`` deadlines fire
on :meth:`~BotSession.advance` instead of after real seconds.

Example::

    from turbobot import ScriptedLLM
    from turbobot.testing import BotTester
    from mybot import bot

    def test_my_bot():
        with BotTester(bot, llm=ScriptedLLM(["Hi!"])) as chat:
            assert chat.say("hello") == ["Hi!"]
            chat.restart()                      # the conversation is rebuilt by replay
            chat.advance(60)                    # deadlines due within a minute fire

The session fails the test (``AssertionError``) when the scripted LLM runs out of
replies, or when a conversation could not be rebuilt by replay (the template is not
deterministic: wrap time, randomness and outside calls in ``Step``).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.clock import FakeClock
from turbobot.llm.base import LLM
from turbobot.llm.scripted import ScriptedLLM
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.store import BaseStore, InMemoryStore
from turbobot.template import Template

__all__ = ["BotSession", "BotTester", "ChatHarness", "FakeClock", "RecordingSender"]

_T = TypeVar("_T")


class RecordingSender(BaseSender):
    """Records every message the bot sends, per channel."""

    def __init__(self) -> None:
        self.sent: list[tuple[ChannelKey, str]] = []
        self._ids = itertools.count(1)

    async def send(self, key: ChannelKey, text: str) -> str | None:
        self.sent.append((key, text))
        return str(next(self._ids))

    def texts(self, key: ChannelKey | None = None) -> list[str]:
        return [text for k, text in self.sent if key is None or k == key]


class BotSession:
    """Drives a template through the real runtime, as a platform adapter would.

    Args:
        template: the bot.
        llm: its model (default: a :class:`ScriptedLLM` with no replies, which fails
            the test if the bot generates).
        store: where conversations live (default: in RAM, kept across
            :meth:`restart`); give a ``SQLStore`` to test on a database.
        settings: runtime settings.
        platform: the platform name channels get (``ChannelKey(platform, channel)``).
        clock: the runtime's clock (default: a :class:`FakeClock`, moved by
            :meth:`advance`).
        expect_divergence: do not fail when a conversation cannot be rebuilt by
            replay (for testing what users see after an incompatible redeploy).
        modes: more personalities users switch to with ``/mode NAME``.
        sender: what records the bot's messages (default: a :class:`RecordingSender`;
            a subclass may fail some sends, or show streams its own way).
    """

    def __init__(
        self,
        template: Template,
        *,
        llm: LLM | None = None,
        store: BaseStore | None = None,
        settings: RuntimeSettings | None = None,
        platform: str = "test",
        clock: Any = None,
        expect_divergence: bool = False,
        modes: Sequence[Template] = (),
        sender: RecordingSender | None = None,
    ) -> None:
        self.template = template
        self.modes = tuple(modes)
        self.expect_divergence = expect_divergence
        self.llm: LLM = llm if llm is not None else ScriptedLLM()
        self.store = store if store is not None else InMemoryStore()
        self.settings = settings
        self.clock = clock if clock is not None else FakeClock()
        self.sender = sender if sender is not None else RecordingSender()
        self.platform = platform
        self.runtime = self._runtime()
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._diverged: set[str] = set()

    def _runtime(self) -> Runtime:
        return Runtime(
            self.template,
            llm=self.llm,
            sender=self.sender,
            store=self.store,
            settings=self.settings,
            clock=self.clock,
            modes=self.modes,
        )

    def key(self, channel: str = "chat") -> ChannelKey:
        return ChannelKey(self.platform, channel)

    def message(self, text: str, *, channel: str = "chat", author: str = "user") -> IncomingMessage:
        # Unique across sessions: a durable inbox ignores ids it has seen before.
        message_id = f"{self._prefix}-{next(self._ids)}"
        return IncomingMessage(
            self.key(channel),
            text,
            message_id,
            author_id=author,
            author_name=author,
            timestamp=self.clock(),
        )

    async def send(self, text: str, *, channel: str = "chat", author: str = "user") -> None:
        """Deliver a message without waiting for the bot (type-ahead)."""
        await self.runtime.receive(self.message(text, channel=channel, author=author))

    async def say(self, text: str, *, channel: str = "chat", author: str = "user") -> list[str]:
        """Deliver a message and wait until the bot has dealt with it.

        Returns the texts the bot sent to that channel meanwhile, in order: each
        ``Assistant`` reply, question and ``Result`` is one text (a streamed reply
        its final text); notices (an apology, "that command is unknown") are texts too.
        """
        before = len(self.sender.sent)
        await self.send(text, channel=channel, author=author)
        await self.settle()
        return self._since(before, channel)

    async def advance(self, seconds: float, *, channel: str | None = None) -> list[str]:
        """Move the clock ``seconds`` forwards, firing the deadlines now due, and wait
        for the bot. Returns what it sent meanwhile (to ``channel``, or anywhere)."""
        if not isinstance(self.clock, FakeClock):
            raise TypeError("advance() needs the session's FakeClock (do not pass clock=)")
        before = len(self.sender.sent)
        self.clock.advance(seconds)
        await self.settle()
        return self._since(before, channel)

    async def restart(self) -> None:
        """Stop the runtime as a deploy would, and start a new one on the same store.

        Conversations are then rebuilt by replaying their journals when their next
        message (or deadline) arrives; one that cannot be fails the test.
        """
        await self.runtime.aclose()
        self.runtime = self._runtime()
        await self.runtime.start()
        await self.settle()

    async def settle(self) -> None:
        """Wait until every message and due deadline is dealt with; then fail the test
        if the scripted LLM ran out of replies or a replay diverged."""
        await asyncio.sleep(0)  # timers already due run at the loop's next turn
        await self.runtime.join()
        exhausted = getattr(self.llm, "exhausted", None)
        if exhausted:
            self.llm.exhausted = None  # type: ignore[attr-defined]
            raise AssertionError(exhausted)
        if self.expect_divergence:
            return
        for record in await self.store.conversations():
            if record.status == "diverged" and record.id not in self._diverged:
                self._diverged.add(record.id)
                raise AssertionError(
                    f"the conversation in {record.key} could not be rebuilt by replay: "
                    f"{self.template.ref} no longer yields what it yielded before the "
                    "restart. Templates must be deterministic: wrap time, randomness and "
                    "outside calls in Step(...)"
                )

    def texts(self, channel: str | None = None) -> list[str]:
        """Everything the bot sent (to ``channel``), across restarts."""
        return self.sender.texts(None if channel is None else self.key(channel))

    async def transcript(self, channel: str = "chat") -> list[tuple[str, str]]:
        """The channel's transcript as stored: ``(role, text)`` pairs, in order."""
        return [(line.role, line.text) for line in await self.store.transcript(self.key(channel))]

    def _since(self, before: int, channel: str | None) -> list[str]:
        return [
            text
            for key, text in self.sender.sent[before:]
            if channel is None or key == self.key(channel)
        ]

    async def aclose(self) -> None:
        await self.runtime.aclose()

    async def __aenter__(self) -> BotSession:
        await self.runtime.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


#: the name used before the kit had restart and a clock
ChatHarness = BotSession


class BotTester:
    """:class:`BotSession` for plain ``def`` tests: the same methods, not awaited.

    It runs its own event loop, so it works under any test runner with no plugin; in
    ``async def`` tests use :class:`BotSession` instead.
    """

    def __init__(self, template: Template, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._session: BotSession = self._run(_make_session(template, options))

    @property
    def session(self) -> BotSession:
        return self._session

    @property
    def llm(self) -> LLM:
        return self._session.llm

    @property
    def clock(self) -> Any:
        return self._session.clock

    def say(self, text: str, *, channel: str = "chat", author: str = "user") -> list[str]:
        return self._run(self._session.say(text, channel=channel, author=author))

    def send(self, text: str, *, channel: str = "chat", author: str = "user") -> None:
        self._run(self._session.send(text, channel=channel, author=author))

    def advance(self, seconds: float, *, channel: str | None = None) -> list[str]:
        return self._run(self._session.advance(seconds, channel=channel))

    def restart(self) -> None:
        self._run(self._session.restart())

    def settle(self) -> None:
        self._run(self._session.settle())

    def texts(self, channel: str | None = None) -> list[str]:
        return self._session.texts(channel)

    def transcript(self, channel: str = "chat") -> list[tuple[str, str]]:
        return self._run(self._session.transcript(channel))

    def close(self) -> None:
        try:
            self._run(self._session.aclose())
        finally:
            self._runner.close()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._runner.run(coro)

    def __enter__(self) -> BotTester:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _make_session(template: Template, options: dict[str, Any]) -> BotSession:
    session = BotSession(template, **options)
    await session.runtime.start()
    return session
