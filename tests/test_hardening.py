"""Core hardening (issue 10): no message, reply or restart can take a bot down.

Each test is named after the defect it reproduces; each failed before its fix.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.conftest import StoreFactory
from tests.test_runtime import echo_llm
from turbobot import (
    ChannelKey,
    Generate,
    GetUserInput,
    IncomingMessage,
    LLMRequest,
    ScriptedLLM,
    Step,
    TemplateError,
    User,
    turbo,
)
from turbobot.codec import json_problem, to_json, writable_text
from turbobot.runtime import RuntimeSettings
from turbobot.testing import ChatHarness


@turbo()
async def chat():
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


# -- 1, 11: a value that cannot be written never stops the store --------------------


HOSTILE = {
    "surrogate": "hi \ud800 there",
    "json-escape": "a \udfff b \ud83d",  # lone halves, as a JSON "\ud800" escape gives
    "nul": "nul\x00byte",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_unwritable_text_is_answered_and_other_channels_go_on(
    make_store: StoreFactory, name: str
) -> None:
    text = HOSTILE[name]
    store = await make_store()
    async with ChatHarness(chat, llm=echo_llm(), store=store) as h:
        hostile, calm = h.message(text, channel="hostile"), h.message("hello", channel="calm")
        # One batch, as one page of platform updates would arrive: the bad row must not
        # take the good one down with it.
        await h.runtime.receive_many([hostile, calm])
        await h.runtime.join()
        replies = h.sender.texts(h.key("hostile"))
        assert replies[0].startswith("Part of your message could not be read")
        assert replies[1] == f"echo: {writable_text(text)}"
        assert h.sender.texts(h.key("calm")) == ["echo: hello"]
        # The store still works for everyone.
        assert await h.say("again", channel="hostile") == ["echo: again"]
        assert await h.say("again", channel="calm") == ["echo: again"]
        # The transcript holds what the template saw; the journal keeps the original.
        lines = await store.transcript(h.key("hostile"))
        assert next(line.text for line in lines if line.role == "user") == writable_text(text)
        record = await store.load_conversation(h.key("hostile"))
        assert record is not None
        first_input = next(e for e in record.journal if e.kind == "input")
        assert first_input.value["incoming"]["raw_text"] == text


async def test_huge_numbers_from_a_platform_or_llm_do_not_stop_the_store(
    make_store: StoreFactory,
) -> None:
    from turbobot.llm.base import LLMResponse
    from turbobot.messages import Usage

    def respond(request: LLMRequest) -> LLMResponse:
        return LLMResponse("ok", (), Usage(10**30, -(10**25)), "stop")

    store = await make_store()
    async with ChatHarness(chat, llm=ScriptedLLM(respond=respond), store=store) as h:
        message = IncomingMessage(h.key(), "hi", "huge-1", timestamp=10**400)  # type: ignore[arg-type]
        await h.runtime.receive(message)
        await h.runtime.join()
        assert h.sender.texts() == ["ok"]
        assert await h.say("more") == ["ok"]
        lines = await store.transcript(h.key())
        assert [line.role for line in lines] == ["user", "assistant", "user", "assistant"]
        assert lines[1].prompt_tokens is None  # out of range: not stored, not fatal


def test_to_json_is_lossless_and_writable() -> None:
    for value in (*HOSTILE.values(), {"k\ud800": ["\x00", 10**40, -1.5, None, True]}):
        text = to_json(value)
        text.encode("utf-8")  # no lone surrogate left
        assert "\x00" not in text
        import json

        assert json.loads(text) == value


# -- 2: input cap -------------------------------------------------------------------------


async def test_a_huge_message_is_capped_for_the_model_and_stored_whole(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    llm = echo_llm()
    settings = RuntimeSettings(max_input_chars=1000)
    async with ChatHarness(chat, llm=llm, store=store, settings=settings) as h:
        text = "x" * 5000 + " the end"
        replies = await h.say(text)
        assert replies[0].startswith("Your message was too long")
        assert "1,000" in replies[0]
        assert replies[1] == "echo: " + "x" * 1000
        assert len(llm.requests[-1].messages[-1]["content"]) == 1000
        record = await store.load_conversation(h.key())
        assert record is not None
        first_input = next(e for e in record.journal if e.kind == "input")
        assert first_input.value["incoming"]["raw_text"] == text
        assert await h.say("short") == ["echo: short"]


# -- 7: Step results are checked where they are produced -------------------------------


def test_json_problem_names_what_would_not_come_back() -> None:
    assert json_problem({"a": [1, "b", None, 2.5]}) is None
    assert "tuple" in (json_problem((1, 2)) or "")
    assert "datetime" in (json_problem([datetime.datetime(2026, 1, 1)]) or "")
    assert "key" in (json_problem({1: "a"}) or "")
    assert "finite" in (json_problem(float("nan")) or "")


async def test_a_step_returning_a_datetime_is_a_clear_template_error(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    @turbo()
    async def clock_bot():
        text = yield GetUserInput()
        try:
            when = yield Step(lambda: datetime.datetime(2026, 1, 1))
        except TemplateError as exc:
            yield User(f"refused: {exc}")
            when = yield Step(lambda: "2026-01-01")
        yield User(f"{text} at {when}")
        yield Generate()
        yield GetUserInput()

    store = await make_store()
    llm = echo_llm()
    async with ChatHarness(clock_bot, llm=llm, store=store) as h:
        replies = await h.say("hi")
        assert replies == ["echo: hi at 2026-01-01"]
        refusal = llm.requests[0].messages[0]["content"]
        assert "clock_bot" in refusal and "datetime" in refusal
        record = await store.load_conversation(h.key())
        assert record is not None and record.status == "waiting"
        assert [e.kind for e in record.journal] == ["input", "error", "step", "generate"]
        # Replayed, the conversation goes on exactly as before.
        await h.runtime.evict(h.key())
        assert await h.say("bye") == []


async def test_an_uncaught_bad_step_result_names_the_template_and_the_value(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    @turbo()
    async def tuple_bot():
        yield GetUserInput()
        yield Step(lambda: (1, 2))
        yield GetUserInput()

    store = await make_store()
    async with ChatHarness(tuple_bot, llm=echo_llm(), store=store) as h:
        replies = await h.say("hi")
        assert replies == [h.runtime.settings.notices.failure]
        assert "tuple_bot" in caplog.text and "(1, 2)" in caplog.text
        # The store is fine: the next message starts a new conversation.
        assert await h.say("again") == [h.runtime.settings.notices.failure]
        records = await store.conversations(h.key())
        assert [r.status for r in records] == ["failed", "failed"]


async def test_the_in_memory_store_round_trips_journal_values_like_sql() -> None:
    @turbo()
    async def lister():
        yield GetUserInput()
        got = yield Step(lambda: {"n": [1, 2]})
        yield User(repr(got))
        yield Generate()
        yield GetUserInput()

    from turbobot.store import InMemoryStore

    store = InMemoryStore()
    async with ChatHarness(lister, llm=echo_llm(), store=store) as h:
        await h.say("hi")
        record = await store.load_conversation(h.key())
        assert record is not None
        step = next(e for e in record.journal if e.kind == "step")
        # a copy made through the store's encoding, not the template's own object
        got: Any = step.value
        assert got == {"n": [1, 2]}
        live = h.runtime._live[h.key()]
        assert live.app is not None
        assert got is not next(e for e in live.app.journal if e.kind == "step").value


# -- 1, 12: the SQL writer isolates a refused row and rides out a database fault --------


@pytest.fixture(params=["sqlite", "postgres"])
async def sql_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    from tests.conftest import _create_database

    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'turbobot.db'}"
    return await _create_database(request.getfixturevalue("postgres"))


async def test_a_row_the_database_refuses_is_dropped_alone(
    sql_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    import turbobot.sql.store as sql_store
    from turbobot.sql import SQLStore
    from turbobot.store import IncomingBatchError

    # What the encoding layer would have made writable reaches the database as it is.
    monkeypatch.setattr(sql_store, "writable_text", lambda text: text)
    key, other = ChannelKey("test", "a"), ChannelKey("test", "b")
    async with SQLStore(sql_url, upgrade=True) as store:
        page = [IncomingMessage(key, "fine", "1"), IncomingMessage(key, "bad", "2\ud800")]
        results = await asyncio.gather(
            store.add_incoming_many(page),
            store.add_incoming(IncomingMessage(other, "calm", "1")),
            return_exceptions=True,
        )
        refused, calm = results
        assert isinstance(refused, IncomingBatchError)
        assert refused.seqs[0] is not None and refused.seqs[1] is None
        assert isinstance(calm, int)
        assert "cannot be stored" in caplog.text and '"test", "a"' in caplog.text
        # The store goes on.
        assert await store.add_incoming(IncomingMessage(key, "after", "3")) is not None
        recovery = await store.recovery()
        assert [i.message.text for i in recovery.inbox] == ["fine", "calm", "after"]


async def test_a_database_fault_costs_no_input_and_needs_no_restart(
    sql_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import sqlite3

    from turbobot.sql import SQLStore

    store = SQLStore(sql_url, upgrade=True, max_retry_delay=0.01)
    await store.open()
    real_commit = store._commit
    fault = asyncio.Event()
    tries = 0

    async def full_disk(batch: Any) -> Any:
        nonlocal tries
        if not fault.is_set():
            tries += 1
            if tries == 5:
                fault.set()  # the operator freed some space
            raise sqlite3.OperationalError("database or disk is full")
        return await real_commit(batch)

    monkeypatch.setattr(store, "_commit", full_disk)
    try:
        async with ChatHarness(chat, llm=echo_llm(), store=store) as h:
            replies = await h.say("during the fault")
            assert replies == ["echo: during the fault"]
            assert tries == 5
            assert await h.say("after") == ["echo: after"]
        lines = await store.transcript(h.key())
        assert [line.text for line in lines] == [
            "during the fault",
            "echo: during the fault",
            "after",
            "echo: after",
        ]
    finally:
        await store.aclose()


# -- 16: only a command word right after the slash is a command -----------------------


def test_slash_space_word_is_text_not_a_command() -> None:
    from turbobot.runtime import parse_command

    assert parse_command("/ start") is None
    assert parse_command("/start") == "start"
    assert parse_command("/start now") == "start"
    assert parse_command("/path/to/file") is None
    assert parse_command("/start.") is None
    assert parse_command("/" + "a" * 33) is None


async def test_slash_space_start_is_an_answer_and_unknown_commands_are_explained() -> None:
    async with ChatHarness(chat, llm=echo_llm()) as h:
        assert await h.say("hello") == ["echo: hello"]
        assert await h.say("/ start") == ["echo: / start"]
        (reply,) = await h.say("/frobnicate now")
        assert "/frobnicate" in reply and "/help" in reply
        # Neither ended the conversation.
        assert await h.say("still here") == ["echo: still here"]
        records = await h.runtime.store.conversations(h.key())
        assert [r.status for r in records] == ["waiting"]
