"""What the runtime records for the operator's page (migration 0005): each step's
timings, tokens and replies, the errors met, the gauges; written to a real SQLite file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from turbobot import (
    Generate,
    GetUserInput,
    LLMRateLimitedError,
    Result,
    ScriptedLLM,
    UndeliverableError,
    User,
    turbo,
)
from turbobot.chat import ChannelKey
from turbobot.clock import FakeClock
from turbobot.llm.base import LLMRequest, LLMResponse
from turbobot.messages import Usage
from turbobot.runtime import Runtime
from turbobot.sql import SQLStore
from turbobot.sql.migrate import upgrade_schema
from turbobot.testing import BotSession, RecordingSender

#: seconds each scripted model call takes (on the fake clock)
MODEL_SECONDS = 0.25


@turbo(model="test-model")
async def assistant():
    while True:
        said = yield GetUserInput()
        if said == "crash":
            raise RuntimeError("the template broke")
        yield User(said)
        yield Generate(stream=said == "stream")


@turbo()
async def greeter():
    name = yield GetUserInput("Your name?")
    yield Result(f"Hello, {name}.")


def slow_model(clock: FakeClock) -> ScriptedLLM:
    def respond(request: LLMRequest) -> LLMResponse:
        clock.advance(MODEL_SECONDS)  # the model takes a while
        said = str(request.messages[-1]["content"])
        return LLMResponse(f"Echo: {said}", usage=Usage(10, 4), model=request.model)

    return ScriptedLLM(respond=respond)


async def rows(url: str, query: str) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(sa.text(query))).mappings())
    finally:
        await engine.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"


@pytest.fixture
async def store(url: str) -> AsyncIterator[SQLStore]:
    store = SQLStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


async def test_a_step_is_recorded_with_its_latency_model_time_tokens_and_replies(
    url: str, store: SQLStore
) -> None:
    clock = FakeClock()
    chat = BotSession(assistant, llm=slow_model(clock), store=store, clock=clock)
    async with chat:
        assert await chat.say("hi", author="u1") == ["Echo: hi"]
        assert await chat.say("stream", author="u1") == ["Echo: stream"]
        await store.flush()
    steps = await rows(url, "SELECT * FROM steps ORDER BY id")
    messages = await rows(url, "SELECT * FROM messages WHERE role = 'assistant' ORDER BY id")
    outbox = await rows(url, "SELECT * FROM outbox ORDER BY id")
    conversations = await rows(url, "SELECT * FROM conversations")
    # the first step begins the conversation and waits (no reply); then one per message
    answered = [s for s in steps if s["replies"]]
    assert [s["trigger"] for s in answered] == ["message", "message"]
    for step in answered:
        assert step["platform"] == "test" and step["user_id"] == "u1"
        assert step["llm"] == pytest.approx(MODEL_SECONDS)
        assert step["first_reply"] == pytest.approx(MODEL_SECONDS)  # the model's time only
        assert step["waited"] == pytest.approx(0.0)
        assert step["duration"] == pytest.approx(MODEL_SECONDS)
        assert (step["model"], step["prompt_tokens"], step["completion_tokens"]) == (
            "test-model",
            10,
            4,
        )
        assert step["generations"] == 1 and step["error"] is None
    assert [(m["text"], bool(m["streamed"])) for m in messages] == [
        ("Echo: hi", False),
        ("Echo: stream", True),
    ]
    assert [m["reply_id"] for m in messages] == [o["id"] for o in outbox]
    assert [(c["platform"], c["user_id"]) for c in conversations] == [("test", "u1")]


async def test_errors_are_recorded_with_their_step(url: str, store: SQLStore) -> None:
    clock = FakeClock()
    llm = ScriptedLLM([LLMRateLimitedError("rate limited (429), try later"), "retried"])
    chat = BotSession(assistant, llm=llm, store=store, clock=clock)
    async with chat:
        await chat.say("hi")  # the model fails: the user gets the apology
        await chat.say("crash")  # the template raises
        await store.flush()
    errors = await rows(url, "SELECT * FROM errors ORDER BY id")
    steps = await rows(url, "SELECT * FROM steps WHERE error IS NOT NULL ORDER BY id")
    assert [e["kind"] for e in errors] == ["llm:LLMRateLimitedError", "template"]
    assert errors[0]["detail"] == "LLMRateLimitedError: rate limited (429), try later"
    assert errors[1]["detail"] == "RuntimeError: the template broke"
    assert all(e["conversation_id"] and e["channel"] for e in errors)
    assert [s["error"] for s in steps] == ["llm:LLMRateLimitedError", "template"]
    assert {s["conversation_id"] for s in steps} == {e["conversation_id"] for e in errors}


class RefusingSender(RecordingSender):
    """Refuses the first send for a while, then blocks every reply to "blocked"."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def send(self, key: ChannelKey, text: str) -> str | None:
        if key.channel == "blocked":
            raise UndeliverableError("Forbidden: bot was blocked by the user")
        if self.failures:
            self.failures -= 1
            raise ConnectionError("platform down")
        return await super().send(key, text)


async def test_failed_and_undeliverable_replies_are_recorded_with_the_reply(
    url: str, store: SQLStore
) -> None:
    clock = FakeClock()
    chat = BotSession(greeter, store=store, clock=clock, sender=RefusingSender())
    async with chat:
        await chat.say("hi")  # "Your name?" fails once, and is kept
        await chat.advance(1)  # ... and sent again
        await chat.say("hi", channel="blocked")
        await store.flush()
    errors = await rows(url, "SELECT * FROM errors ORDER BY id")
    outbox = {
        o["text"]: o for o in await rows(url, "SELECT * FROM outbox WHERE channel LIKE '%chat%'")
    }
    assert [e["kind"] for e in errors] == ["send", "undeliverable"]
    assert errors[0]["detail"] == "ConnectionError: platform down"
    # no latency for a reply that did not get through in its step, nor for one dropped
    steps = await rows(url, "SELECT * FROM steps WHERE replies > 0 ORDER BY id")
    assert [s["first_reply"] for s in steps] == [None, None]
    assert errors[0]["reply_id"] == outbox["Your name?"]["id"]
    assert errors[0]["reply_id"] != errors[1]["reply_id"] is not None
    assert chat.sender.texts() == ["Your name?"]


async def test_the_gauges_are_written_as_samples(url: str, store: SQLStore) -> None:
    clock = FakeClock()
    chat = BotSession(greeter, store=store, clock=clock)
    async with chat:
        await chat.say("hi", channel="a")
        await chat.say("hi", channel="b")
        await chat.runtime.evict(chat.key("a"))
        sample = await chat.runtime.sample()
        await store.flush()
    (row,) = await rows(url, "SELECT * FROM samples")
    assert (row["live"], row["queued"], row["evictions"], row["replays"]) == (1, 0, 1, 0)
    assert row["at"] == clock.now and row["worker"] == sample.worker


async def test_the_upgrade_fills_in_platform_and_user_of_conversations_already_there(
    tmp_path: Path,
) -> None:
    from alembic import command

    from turbobot.sql.migrate import alembic_config

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0004"))
            for i, (channel, context) in enumerate(
                [
                    ('["discord", "42", null, null]', '{"author_id": "7", "platform": "discord"}'),
                    ('["telegram", "9", null, null]', "{}"),
                    ("not json", "not json either"),
                ]
            ):
                await conn.execute(
                    sa.text(
                        "INSERT INTO conversations (id, channel, template_ref, context, status, "
                        "yields, broken, started_at) VALUES (:id, :channel, 't', :context, "
                        "'waiting', 0, 0, 1.0)"
                    ),
                    {"id": f"c{i}", "channel": channel, "context": context},
                )
            await conn.run_sync(upgrade_schema)
            found = (
                await conn.execute(
                    sa.text("SELECT platform, user_id FROM conversations ORDER BY id")
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in found] == [("discord", "7"), ("telegram", None), (None, None)]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message")


@turbo()
async def unprintable():
    yield GetUserInput("Go?")
    raise Unprintable


async def test_an_error_that_cannot_be_printed_still_ends_its_step_well(
    url: str, store: SQLStore
) -> None:
    """(Review: error_detail raised, the failure notice was never sent, and the
    conversation stayed waiting.)"""
    chat = BotSession(unprintable, store=store, clock=FakeClock())
    async with chat:
        await chat.say("hi")
        said = await chat.say("go")
        await store.flush()
    assert said == [chat.runtime.settings.notices.failure]
    (error,) = await rows(url, "SELECT kind, detail FROM errors")
    assert (error["kind"], error["detail"]) == ("template", "Unprintable")
    (conversation,) = await rows(url, "SELECT status FROM conversations")
    assert conversation["status"] == "failed"


class BlockedSender(RecordingSender):
    async def send(self, key: ChannelKey, text: str) -> str | None:
        raise UndeliverableError("Forbidden: bot was blocked by the user")


async def test_a_streamed_reply_that_cannot_be_delivered_is_not_counted_as_sent(
    url: str, store: SQLStore
) -> None:
    from turbobot.metrics import Metrics

    clock = FakeClock()
    metrics = Metrics()
    chat = BotSession(assistant, llm=slow_model(clock), store=store, clock=clock,
                      sender=BlockedSender())  # fmt: skip
    chat.runtime = Runtime(assistant, llm=chat.llm, sender=chat.sender, store=store,
                           clock=clock, metrics=metrics)  # fmt: skip
    async with chat:
        await chat.say("stream")
        await chat.say("plain")
        await store.flush()
    assert metrics.value("turbobot_replies_sent_total", platform="test") == 0
    assert metrics.value("turbobot_errors_total", kind="undeliverable") == 2
    steps = await rows(url, "SELECT first_reply FROM steps WHERE replies > 0")
    assert [s["first_reply"] for s in steps] == [None, None]
