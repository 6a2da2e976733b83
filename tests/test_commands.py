"""The command registry, /retry, /cancel and a bot's own commands (issue 10)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import StoreFactory
from tests.test_regressions import chat
from tests.test_runtime import echo_llm
from turbobot import LLMRequest, ScriptedLLM
from turbobot.commands import BUILT_IN, Command, CommandCall, CommandRegistry
from turbobot.llm.base import LLMResponse
from turbobot.testing import ChatHarness


def test_the_registry_lists_built_ins_then_the_bots_own() -> None:
    async def ping(call: CommandCall) -> str:
        return "pong"

    registry = CommandRegistry([Command("ping", "Check the bot", ping)])
    names = [name for name, _ in registry.menu()]
    assert names == [c.name for c in BUILT_IN] + ["ping"]
    assert "new" in registry and registry.get("new") is registry.get("start")
    with pytest.raises(ValueError, match="lowercase"):
        Command("Bad-Name", "x")
    with pytest.raises(ValueError, match="twice"):
        registry.add(Command("ping", "again", ping))


async def test_a_bots_command_answers_outside_the_conversation(make_store: StoreFactory) -> None:
    async def ping(call: CommandCall) -> str:
        return f"pong {call.args}".strip()

    bot = chat.configure(commands=[Command("ping", "Check the bot", ping)])
    store = await make_store()
    async with ChatHarness(bot, llm=echo_llm(), store=store) as h:
        assert await h.say("hi") == ["echo: hi"]
        assert await h.say("/ping now") == ["pong now"]
        assert await h.say("more") == ["echo: more"]  # the conversation did not see it
        (help_text,) = await h.say("/help")
        assert help_text.startswith("Echoes what you say.")
        assert "/ping - Check the bot" in help_text and "/retry" in help_text


async def test_retry_generates_the_last_reply_again(make_store: StoreFactory) -> None:
    answers = iter(["first try", "second try", "third"])
    seen: list[list[dict[str, Any]]] = []

    def respond(request: LLMRequest) -> str:
        seen.append(list(request.messages))
        return next(answers)

    store = await make_store()
    async with ChatHarness(chat, llm=ScriptedLLM(respond=respond), store=store) as h:
        assert await h.say("question") == ["first try"]
        assert await h.say("/retry") == ["second try"]
        # The retried reply replaced the first in the model's memory.
        assert await h.say("and?") == ["third"]
        assert [m["content"] for m in seen[-1]] == ["question", "second try", "and?"]
        # Replayed from the store, the conversation agrees.
        await h.runtime.evict(h.key())
        record = await store.load_conversation(h.key())
        assert record is not None
        assert [e.kind for e in record.journal] == ["input", "generate", "input", "generate"]
        assert record.journal[1].value["content"] == "second try"
        lines = await store.transcript(h.key())
        assert [line.text for line in lines] == [
            "question",
            "first try",
            "/retry",
            "second try",
            "and?",
            "third",
        ]


async def test_retry_with_nothing_to_retry_says_so() -> None:
    async with ChatHarness(chat, llm=echo_llm()) as h:
        assert await h.say("/retry") == [h.runtime.settings.notices.retry_nothing]


async def test_cancel_stops_the_generation_in_progress(make_store: StoreFactory) -> None:
    started = asyncio.Event()

    class SlowLLM:
        calls = 0

        async def complete(self, request: LLMRequest, *, on_delta: Any = None) -> LLMResponse:
            self.calls += 1
            if self.calls == 1:
                started.set()
                await asyncio.Event().wait()  # the model takes for ever
            return LLMResponse(f"echo: {request.messages[-1]['content']}", (), None, "stop")

        async def aclose(self) -> None:
            return None

    store = await make_store()
    async with ChatHarness(chat, llm=SlowLLM(), store=store) as h:
        notices = h.runtime.settings.notices
        await h.send("write me an essay")
        await asyncio.wait_for(started.wait(), 5)
        assert await h.say("/cancel") == [notices.cancelled]
        # The conversation goes on; the cancelled answer is not in its memory.
        assert await h.say("short one") == ["echo: short one"]
        assert await h.say("/cancel") == [notices.cancel_nothing]
        await h.runtime.evict(h.key())
        assert await h.say("after replay") == ["echo: after replay"]
        record = await store.load_conversation(h.key())
        assert record is not None
        assert "cancelled" in [e.kind for e in record.journal]
