"""Helpers for testing bots: a recording sender and a chat driver with a scripted LLM.

Example::

    async def test_my_bot():
        async with ChatHarness(my_bot, llm=ScriptedLLM(["Hi!"])) as chat:
            assert await chat.say("hello") == ["Hi!"]
"""

from __future__ import annotations

import itertools
import uuid

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.llm.base import LLM
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.store import BaseStore
from turbobot.template import Template

__all__ = ["ChatHarness", "RecordingSender"]


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


class ChatHarness:
    """Drives a template through the real runtime, as a platform adapter would."""

    def __init__(
        self,
        template: Template,
        *,
        llm: LLM,
        store: BaseStore | None = None,
        settings: RuntimeSettings | None = None,
        platform: str = "test",
    ) -> None:
        self.sender = RecordingSender()
        self.runtime = Runtime(
            template, llm=llm, sender=self.sender, store=store, settings=settings
        )
        self.platform = platform
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]

    def key(self, channel: str = "chat") -> ChannelKey:
        return ChannelKey(self.platform, channel)

    def message(self, text: str, *, channel: str = "chat", author: str = "user") -> IncomingMessage:
        # Unique across harnesses: a durable inbox ignores ids it has seen before.
        message_id = f"{self._prefix}-{next(self._ids)}"
        return IncomingMessage(
            self.key(channel), text, message_id, author_id=author, author_name=author
        )

    async def send(self, text: str, *, channel: str = "chat") -> None:
        """Deliver a message without waiting for the bot (type-ahead)."""
        await self.runtime.receive(self.message(text, channel=channel))

    async def say(self, text: str, *, channel: str = "chat") -> list[str]:
        """Deliver a message and return what the bot sent in reply."""
        before = len(self.sender.sent)
        await self.send(text, channel=channel)
        await self.runtime.join()
        return [t for k, t in self.sender.sent[before:] if k == self.key(channel)]

    async def __aenter__(self) -> ChatHarness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.runtime.aclose()
