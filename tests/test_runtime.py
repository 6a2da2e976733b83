"""The conversation rules (docs/architecture.md, "Conversations") with a scripted LLM."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import StoreFactory
from turbobot import (
    Generate,
    GetUserInput,
    IncomingMessage,
    LLMRequest,
    LLMUnavailableError,
    Result,
    ScriptedLLM,
    System,
    User,
    turbo,
)
from turbobot.runtime import RuntimeSettings, parse_command
from turbobot.testing import ChatHarness


@turbo()
async def chat():
    """A chat bot that echoes through the model."""
    yield System("sys")
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


@turbo()
async def survey():
    name = yield GetUserInput("What is your name?")
    colour = yield GetUserInput(f"Hi {name}. Favourite colour?")
    yield Result(f"{name} likes {colour}.")


def echo_llm(delay: float = 0.0) -> ScriptedLLM:
    def respond(request: LLMRequest) -> str:
        return f"echo: {request.messages[-1]['content']}"

    llm = ScriptedLLM(respond=respond)
    if delay:
        original = llm.complete

        async def slow(request: LLMRequest, **kwargs: Any) -> Any:
            await asyncio.sleep(delay)
            return await original(request, **kwargs)

        llm.complete = slow  # type: ignore[method-assign]
    return llm


async def test_chat_style_first_message_is_input() -> None:
    async with ChatHarness(chat, llm=echo_llm()) as h:
        assert await h.say("hello") == ["echo: hello"]
        assert await h.say("again") == ["echo: again"]


async def test_question_first_message_only_wakes_the_bot() -> None:
    async with ChatHarness(survey, llm=echo_llm()) as h:
        assert await h.say("hey") == ["What is your name?"]
        assert await h.say("Ann") == ["Hi Ann. Favourite colour?"]
        assert await h.say("green") == ["Ann likes green."]


async def test_template_end_starts_new_conversation_with_empty_memory() -> None:
    async with ChatHarness(survey, llm=echo_llm()) as h:
        for text in ("hey", "Ann", "green"):
            await h.say(text)
        assert await h.say("again") == ["What is your name?"]
        conversations = await h.runtime.store.conversations(h.key())
        assert [c.status for c in conversations] == ["finished", "waiting"]
        transcript = await h.runtime.store.transcript(h.key())
        assert [line.conversation_id for line in transcript].count(conversations[0].id) == 6


async def test_type_ahead_is_answered_in_order() -> None:
    llm = echo_llm(delay=0.05)
    async with ChatHarness(chat, llm=llm) as h:
        for text in ("one", "two", "three"):
            await h.send(text)  # all arrive while the first is generating
        await h.runtime.join()
        assert h.sender.texts() == ["echo: one", "echo: two", "echo: three"]
        last_prompt = llm.requests[-1].messages  # type: ignore[attr-defined]
        assert [m["content"] for m in last_prompt if m["role"] == "user"] == ["one", "two", "three"]


async def test_channels_run_concurrently() -> None:
    async with ChatHarness(chat, llm=echo_llm(delay=0.2)) as h:
        start = asyncio.get_running_loop().time()
        for n in range(5):
            await h.send(f"hi {n}", channel=f"c{n}")
        await h.runtime.join()
        elapsed = asyncio.get_running_loop().time() - start
        assert elapsed < 0.6, f"5 channels took {elapsed:.2f}s: they ran one after another"
        for n in range(5):
            assert h.sender.texts(h.key(f"c{n}")) == [f"echo: hi {n}"]


async def test_start_restarts_and_is_never_input() -> None:
    async with ChatHarness(survey, llm=echo_llm()) as h:
        await h.say("hey")
        await h.say("Ann")
        assert await h.say("/start") == ["What is your name?"]
        assert await h.say("Bob") == ["Hi Bob. Favourite colour?"]
        statuses = [c.status for c in await h.runtime.store.conversations(h.key())]
        assert statuses == ["restarted", "waiting"]


async def test_start_on_chat_bot_is_not_input_and_says_started() -> None:
    llm = echo_llm()
    async with ChatHarness(chat, llm=llm) as h:
        assert await h.say("/start@mybot") == ["New conversation started."]
        assert llm.calls == 0
        assert await h.say("hi") == ["echo: hi"]


async def test_command_for_another_bot_is_plain_text() -> None:
    settings = RuntimeSettings(bot_username="mybot")
    async with ChatHarness(chat, llm=echo_llm(), settings=settings) as h:
        assert await h.say("/start@otherbot") == ["echo: /start@otherbot"]


async def test_reset_ends_and_clears_memory() -> None:
    llm = echo_llm()
    async with ChatHarness(chat, llm=llm) as h:
        await h.say("remember me")
        assert await h.say("/reset") == ["Conversation reset. Send a message to start again."]
        await h.say("fresh")
        last_prompt = llm.requests[-1].messages
        assert [m["content"] for m in last_prompt] == ["sys", "fresh"]


async def test_help_uses_the_template_docstring() -> None:
    async with ChatHarness(chat, llm=echo_llm()) as h:
        (reply,) = await h.say("/help")
        assert reply.startswith("A chat bot that echoes through the model.")
        assert "/reset" in reply


async def test_duplicate_message_ids_are_processed_once() -> None:
    async with ChatHarness(chat, llm=echo_llm()) as h:
        message = h.message("once")
        assert await h.runtime.receive(message) is True
        assert await h.runtime.receive(message) is False
        await h.runtime.join()
        assert h.sender.texts() == ["echo: once"]


async def test_a_page_of_messages_is_received_in_order(make_store: StoreFactory) -> None:
    from dataclasses import replace

    async with ChatHarness(survey, llm=echo_llm(), store=await make_store()) as h:
        first = h.message("hey")
        page = [
            first,
            h.message("other", channel="c2"),
            replace(h.message("beep"), is_bot=True),
            first,  # redelivered within the page
            h.message("Ann"),
        ]
        assert await h.runtime.receive_many(page) == [True, True, False, False, True]
        await h.runtime.join()
        assert h.sender.texts(h.key()) == ["What is your name?", "Hi Ann. Favourite colour?"]
        assert h.sender.texts(h.key("c2")) == ["What is your name?"]
        assert await h.runtime.receive_many([first]) == [False]


async def test_messages_from_bots_are_ignored() -> None:
    from dataclasses import replace

    async with ChatHarness(chat, llm=echo_llm()) as h:
        assert await h.runtime.receive(replace(h.message("beep"), is_bot=True)) is False
        await h.runtime.join()
        assert h.sender.texts() == []


async def test_timeout_reaches_the_template() -> None:
    @turbo()
    async def patient():
        answer = yield GetUserInput("Ready?", timeout=0.2)
        if answer.timed_out:
            yield Result("Too slow.")
        else:
            yield Result(f"Got {answer}.")

    async with ChatHarness(patient, llm=echo_llm()) as h:
        assert await h.say("hi") == ["Ready?"]
        assert await h.advance(0.19) == []  # not due yet
        assert await h.advance(0.01) == ["Too slow."]
        assert await h.say("hi again") == ["Ready?"]
        assert await h.say("yes") == ["Got yes."]
        assert await h.advance(1.0) == []  # answered: its deadline is gone


async def test_failed_generation_apologises_then_retries_on_next_message() -> None:
    llm = ScriptedLLM(["first", LLMUnavailableError("down"), "second (retried)", "third"])
    async with ChatHarness(chat, llm=llm) as h:
        assert await h.say("one") == ["first"]
        assert await h.say("two") == [
            "Sorry, I could not answer just now. Send another message and I will try again."
        ]
        # The next message triggers the retry of "two", then is answered itself.
        assert await h.say("three") == ["second (retried)", "third"]
        prompts = [[m["content"] for m in r.messages if m["role"] == "user"] for r in llm.requests]
        assert prompts[2] == ["one", "two"]  # the retry answers "two"
        assert prompts[3] == ["one", "two", "three"]


async def test_failed_retry_keeps_the_message() -> None:
    calls = {"n": 0}

    def respond(request: LLMRequest) -> str | LLMUnavailableError:
        calls["n"] += 1
        if calls["n"] <= 2:
            return LLMUnavailableError("down")
        return f"echo: {request.messages[-1]['content']}"

    llm = ScriptedLLM(respond=respond)
    async with ChatHarness(chat, llm=llm) as h:
        await h.say("one")
        await h.say("two")  # the retry fails again: "two" stays in the inbox
        inbox = (await h.runtime.store.recovery()).inbox
        assert [item.message.text for item in inbox] == ["two"]
        assert await h.say("three") == ["echo: one", "echo: two", "echo: three"]
        assert (await h.runtime.store.recovery()).inbox == []


async def test_template_crash_ends_conversation_with_notice() -> None:
    @turbo()
    async def crashy():
        yield GetUserInput("Go?")
        raise RuntimeError("bug")

    async with ChatHarness(crashy, llm=echo_llm()) as h:
        await h.say("hi")
        (reply,) = await h.say("go")
        assert "something went wrong" in reply
        assert await h.say("hi") == ["Go?"]


def test_parse_command_forms() -> None:
    assert parse_command("/start") == "start"
    assert parse_command("/START@MyBot extra", "mybot") == "start"
    assert parse_command("/start@other", "mybot") is None
    assert parse_command("hello /start") is None
    assert parse_command("/") is None


async def test_the_gc_threshold_is_opt_in_and_never_lowered() -> None:
    import gc

    original = gc.get_threshold()
    raised = RuntimeSettings(gc_threshold=10_000)
    try:
        gc.set_threshold(700, 10, 10)
        async with ChatHarness(chat, llm=echo_llm()) as h:  # a library leaves it alone
            await h.say("hi")
        assert gc.get_threshold() == (700, 10, 10)
        async with ChatHarness(chat, llm=echo_llm(), settings=raised) as h:
            await h.say("hi")
        assert gc.get_threshold() == (10_000, 10, 10)
        gc.set_threshold(50_000, 5, 5)
        async with ChatHarness(chat, llm=echo_llm(), settings=raised) as h:
            await h.say("hi")
        assert gc.get_threshold() == (50_000, 5, 5)
    finally:
        gc.set_threshold(*original)


async def test_a_page_that_fails_half_way_still_schedules_what_was_committed() -> None:
    from turbobot.store import InMemoryStore

    class Flaky(InMemoryStore):
        async def add_incoming(self, message: IncomingMessage) -> int | None:
            await asyncio.sleep(0)
            if message.text == "bad":
                raise ConnectionError("the database hiccuped")
            return await super().add_incoming(message)

    async with ChatHarness(chat, llm=echo_llm(), store=Flaky()) as h:
        page = [h.message("good", channel="a"), h.message("bad", channel="b")]
        # The one that could not be stored is not lost silently: its sender is told
        # (issue 10: a store's refusal never stops the adapter, which would stop everyone).
        assert await h.runtime.receive_many(page) == [True, False]
        await h.runtime.join()
        assert h.sender.texts(h.key("a")) == ["echo: good"]
        assert h.sender.texts(h.key("b")) == [h.runtime.settings.notices.not_stored]
