"""Core hardening (issue 10): no message, reply or restart can take a bot down.

Each test is named after the defect it reproduces; each failed before its fix.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tests.conftest import StoreFactory
from tests.test_regressions import chat
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
    received: list[Any] = []

    @turbo()
    async def lister():
        yield GetUserInput()
        got = yield Step(lambda: {"n": [1, 2]})
        received.append(got)
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
        assert step.value == {"n": [1, 2]} == received[0]
        assert step.value is not received[0]
        assert step.value["n"] is not received[0]["n"]


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
        assert refused.failed == [1]
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


# -- 6, 13: failed and refused generations ---------------------------------------------


async def test_a_failed_generation_waits_for_the_next_message_across_restarts(
    make_store: StoreFactory,
) -> None:
    from turbobot import LLMUnavailableError

    store = await make_store()
    down = ScriptedLLM([LLMUnavailableError("down")] * 3)
    async with ChatHarness(chat, llm=down, store=store) as h:
        assert await h.say("hi") == [h.runtime.settings.notices.apology]
    # Two restarts while the LLM is still down: no call, no apology nobody asked for.
    for _ in range(2):
        store = await make_store()
        async with ChatHarness(chat, llm=down, store=store) as h:
            await h.runtime.start()
            await h.runtime.join()
            assert h.sender.sent == []
    assert down.calls == 1
    store = await make_store()
    async with ChatHarness(chat, llm=echo_llm(), store=store) as h:
        # The next message retries the generation, then is answered in its turn.
        assert await h.say("again") == ["echo: hi", "echo: again"]


async def test_a_permanently_refused_request_is_not_retried_for_ever(
    make_store: StoreFactory,
) -> None:
    from turbobot import LLMRequestError

    refused = LLMRequestError("the prompt is too large (HTTP 413)", status_code=413)
    llm = ScriptedLLM([refused, "fresh answer"])
    store = await make_store()
    async with ChatHarness(chat, llm=llm, store=store) as h:
        (notice,) = await h.say("x" * 100)
        assert "refused" in notice and "413" in notice
        # The conversation ended; the next message starts a new one and is answered.
        assert await h.say("hello") == ["fresh answer"]
        records = await store.conversations(h.key())
        assert [r.status for r in records] == ["failed", "waiting"]


async def test_commands_are_handled_while_a_generation_keeps_failing() -> None:
    from turbobot import LLMUnavailableError

    llm = ScriptedLLM(respond=lambda request: LLMUnavailableError("down"))
    async with ChatHarness(chat, llm=llm) as h:
        notices = h.runtime.settings.notices
        assert await h.say("hi") == [notices.apology]
        assert await h.say("still there?") == [notices.apology]
        (help_text,) = await h.say("/help")
        assert "/start" in help_text
        # /reset ends the conversation with the messages that waited for it unanswered
        # (kept in its transcript), instead of starting a new one with them.
        assert await h.say("/reset") == [notices.reset]
        assert await h.say("/help") == [help_text]
        lines = await h.runtime.store.transcript(h.key())
        assert [line.text for line in lines if line.role == "user"] == [
            "hi",
            "still there?",
            "/reset",
        ]
        assert llm.calls == 2


# -- 15: the typing indicator also runs while a reply streams --------------------------


async def test_typing_is_shown_while_a_reply_streams() -> None:
    import asyncio

    from turbobot.runtime import BaseSender
    from turbobot.template import AssistantStream

    typed = asyncio.Event()

    class Sender(BaseSender):
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send(self, key: Any, text: str) -> str | None:
            self.sent.append(text)
            return "1"

        async def send_stream(self, key: Any, stream: AssistantStream) -> str | None:
            async for _ in stream:
                pass
            self.sent.append(stream.text)
            return "2"

        async def typing(self, key: Any) -> None:
            typed.set()

    class SlowLLM:
        async def complete(self, request: LLMRequest, *, on_delta: Any = None) -> Any:
            from turbobot.llm.base import LLMResponse

            await on_delta("first ")
            await typed.wait()  # finishes only once the indicator was shown mid-stream
            await on_delta("second")
            return LLMResponse("first second", (), None, "stop")

        async def aclose(self) -> None:
            return None

    @turbo()
    async def streamer():
        text = yield GetUserInput()
        yield User(text)
        yield Generate(stream=True)

    from turbobot.runtime import Runtime

    sender = Sender()
    settings = RuntimeSettings(typing_delay=0.0)
    async with Runtime(streamer, llm=SlowLLM(), sender=sender, settings=settings) as runtime:
        await runtime.receive(IncomingMessage(ChannelKey("t", "c"), "hi", "1"))
        await asyncio.wait_for(runtime.join(), 5)
    assert sender.sent == ["first second"]


# -- 3, 10: delivery and storage faults are retried, never fatal -----------------------


class FlakySender:
    """Fails the first ``failures`` sends (the platform is down), then works."""

    def __init__(self, failures: int, error: Exception) -> None:
        from turbobot.testing import RecordingSender

        self.inner = RecordingSender()
        self.failures = failures
        self.error = error

    async def send(self, key: Any, text: str) -> str | None:
        if self.failures:
            self.failures -= 1
            raise self.error
        return await self.inner.send(key, text)


async def test_start_never_fails_on_unsent_replies(make_store: StoreFactory) -> None:
    import asyncio

    from turbobot import UndeliverableError
    from turbobot.runtime import Runtime
    from turbobot.store import OutgoingRecord, StepWrite, new_id
    from turbobot.testing import RecordingSender

    store = await make_store()
    blocked, down = ChannelKey("t", "blocked"), ChannelKey("t", "down")
    await store.write(
        StepWrite(
            outgoing=[
                OutgoingRecord(new_id(), blocked, "to a user who blocked the bot"),
                OutgoingRecord(new_id(), down, "while the network is down"),
            ]
        )
    )
    await store.flush()

    class Sender(RecordingSender):
        def __init__(self) -> None:
            super().__init__()
            self.down = 2

        async def send(self, key: ChannelKey, text: str) -> str | None:
            if key == blocked:
                raise UndeliverableError("Forbidden: bot was blocked by the user")
            if self.down:
                self.down -= 1
                raise ConnectionError("network is unreachable")
            return await super().send(key, text)

    sender = Sender()
    settings = RuntimeSettings(retry_delays=(0.0,))
    runtime = Runtime(chat, llm=echo_llm(), sender=sender, store=store, settings=settings)
    await asyncio.wait_for(runtime.start(), 5)  # does not wait on the platform
    for _ in range(100):
        if sender.sent:
            break
        await asyncio.sleep(0)  # let the retries run (no time passes: delays are 0)
        await runtime.join()
    await runtime.aclose()
    assert sender.texts() == ["while the network is down"]
    assert (await store.recovery()).unsent == []


async def test_a_store_fault_mid_step_is_retried_not_a_template_failure(
    make_store: StoreFactory,
) -> None:
    from turbobot.store import StepWrite

    store = await make_store()
    real_write = store.write
    faults = [OSError("No space left on device")]

    async def write(step: StepWrite) -> None:
        if step.outgoing and faults:
            raise faults.pop()
        await real_write(step)

    store.write = write  # type: ignore[method-assign]
    settings = RuntimeSettings(retry_delays=(0.0,))
    async with ChatHarness(chat, llm=echo_llm(), store=store, settings=settings) as h:
        await h.send("hi")
        for _ in range(100):
            await h.runtime.join()
            if h.sender.sent:
                break
            import asyncio

            await asyncio.sleep(0)
        assert h.sender.texts() == ["echo: hi"]
        assert await h.say("more") == ["echo: more"]
        records = await store.conversations(h.key())
        assert [r.status for r in records] == ["waiting"]


# -- 5: what the user saw of a broken-off stream and the transcript agree ---------------


class BreaksOffLLM:
    """Streams a fragment, then the connection breaks (after the OpenAI layer's retries)."""

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: LLMRequest, *, on_delta: Any = None) -> Any:
        from turbobot import LLMUnavailableError
        from turbobot.llm.base import LLMResponse

        self.calls += 1
        if self.calls == 1:
            await on_delta("The answer is ")
            raise LLMUnavailableError("the stream broke off after 14 characters")
        text = "The answer is 42." if self.calls == 2 else "Anything else?"
        await on_delta(text)
        return LLMResponse(text, (), None, "stop")

    async def aclose(self) -> None:
        return None


@turbo()
async def streaming_chat():
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate(stream=True)


async def test_a_broken_off_stream_is_marked_on_the_console_and_in_the_transcript() -> None:
    import io

    from turbobot.adapters.console import ConsoleAdapter
    from turbobot.runtime import Runtime
    from turbobot.template import INTERRUPTED

    out = io.StringIO()
    adapter = ConsoleAdapter(stdin=io.StringIO("question\nagain\n"), stdout=out)
    async with Runtime(streaming_chat, llm=BreaksOffLLM(), sender=adapter) as runtime:
        await adapter.run(runtime)
        lines = await runtime.store.transcript(adapter.key)
    apology = runtime.settings.notices.apology
    assert out.getvalue().splitlines() == [
        f"The answer is {INTERRUPTED}",
        apology,
        "The answer is 42.",
        "Anything else?",
    ]
    assert [(line.role, line.text) for line in lines] == [
        ("user", "question"),
        ("assistant", f"The answer is {INTERRUPTED}"),
        ("assistant", apology),
        # "again" made the bot retry first; it is used (and answered) after that
        ("assistant", "The answer is 42."),
        ("user", "again"),
        ("assistant", "Anything else?"),
    ]


async def test_a_broken_off_stream_is_not_sent_as_a_finished_reply() -> None:
    async with ChatHarness(streaming_chat, llm=BreaksOffLLM()) as h:
        apology = h.runtime.settings.notices.apology
        assert await h.say("question") == [apology]
        assert await h.say("again") == ["The answer is 42.", "Anything else?"]
        lines = await h.runtime.store.transcript(h.key())
        assert "The answer is " not in [line.text for line in lines]


# -- 18: a conversation belongs to its template -----------------------------------------


@turbo()
async def asker():
    """Asks a name, then greets."""
    name = yield GetUserInput("What is your name?")
    yield User(f"Greet {name}")
    yield Generate()
    yield GetUserInput()


async def test_two_bots_on_one_channel_keep_their_own_conversations(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    async with ChatHarness(asker, llm=echo_llm(), store=store) as a:
        assert await a.say("hi") == ["What is your name?"]
    store = await make_store()
    async with ChatHarness(chat, llm=echo_llm(), store=store) as b:
        replies = await b.say("Bob")
        # B starts its own conversation and says why; it does not answer A's question.
        assert len(replies) == 2 and "another bot" in replies[0]
        assert replies[1] == "echo: Bob"
        assert await b.say("more") == ["echo: more"]
    store = await make_store()
    async with ChatHarness(asker, llm=echo_llm(), store=store) as a:
        # A's conversation was neither replayed by B nor marked diverged: it goes on.
        replies = await a.say("Alice")
        assert replies[-1] == "echo: Greet Alice"
    records = await store.conversations(a.key())
    assert sorted((r.template_ref.rsplit(":", 1)[1], r.status) for r in records) == [
        ("asker", "waiting"),
        ("chat", "waiting"),
    ]


# -- 8: the message that woke a bot is not taken for an answer after a crash -------------


async def test_a_crash_between_greeting_and_question_keeps_the_wake_message_apart(
    make_store: StoreFactory,
) -> None:
    import asyncio

    from tests.test_regressions import crash
    from turbobot import Assistant
    from turbobot.runtime import Runtime
    from turbobot.testing import RecordingSender

    @turbo()
    async def greeter():
        yield Assistant("Welcome!")
        sign = yield GetUserInput("Your sign?")
        yield GetUserInput(f"Noted: {sign}.")

    class HangsOnWelcome(RecordingSender):
        async def send(self, key: ChannelKey, text: str) -> str | None:
            if text == "Welcome!":
                await asyncio.Event().wait()  # the process dies while sending this
            return await super().send(key, text)

    key = ChannelKey("test", "chat")
    store = await make_store()
    first = Runtime(greeter, llm=echo_llm(), sender=HangsOnWelcome(), store=store)
    await first.receive(IncomingMessage(key, "hi", "m1"))
    await crash(first)

    store = await make_store()
    sender = RecordingSender()
    async with Runtime(greeter, llm=echo_llm(), sender=sender, store=store) as runtime:
        await runtime.join()
        # The greeting is delivered and the question asked; "hi" is not the answer.
        assert sender.texts() == ["Welcome!", "Your sign?"]
        await runtime.receive(IncomingMessage(key, "Leo", "m2"))
        await runtime.join()
        assert sender.texts()[-1] == "Noted: Leo."
        assert (await store.recovery()).inbox == []


# -- 17: a stop in the middle of a generation loses no reply -----------------------------


async def test_a_stop_mid_generation_is_done_again_on_the_next_start(
    make_store: StoreFactory,
) -> None:
    import asyncio

    from turbobot.runtime import Runtime
    from turbobot.testing import RecordingSender

    class Hangs:
        async def complete(self, request: LLMRequest, *, on_delta: Any = None) -> Any:
            await asyncio.Event().wait()

        async def aclose(self) -> None:
            return None

    key = ChannelKey("test", "chat")
    store = await make_store()
    stopping = RuntimeSettings(stop_grace=0.0)  # do not wait for the step in flight
    first = Runtime(chat, llm=Hangs(), sender=RecordingSender(), store=store, settings=stopping)
    await first.receive(IncomingMessage(key, "hi", "m1"))
    await first.receive(IncomingMessage(key, "there", "m2"))
    for _ in range(20):
        await asyncio.sleep(0)  # let the first step reach the model
    await first.aclose()
    sender = RecordingSender()
    store = await make_store()
    async with Runtime(chat, llm=echo_llm(), sender=sender, store=store) as runtime:
        await runtime.join()
        # Both messages answered, in order, without new input; nothing twice.
        assert sender.texts() == ["echo: hi", "echo: there"]
    lines = await store.transcript(key)
    assert [line.text for line in lines] == ["hi", "echo: hi", "there", "echo: there"]


# -- 9: PostgreSQL: an ambiguous COMMIT is not retried blindly ---------------------------


async def test_a_commit_whose_answer_is_lost_is_not_committed_twice(
    request: pytest.FixtureRequest,
) -> None:
    from fakes.cutting_proxy import CuttingProxy
    from tests.conftest import _create_database
    from turbobot.runtime import Runtime
    from turbobot.sql import SQLStore
    from turbobot.testing import RecordingSender

    server = request.getfixturevalue("postgres")
    url = await _create_database(server)
    proxy = await CuttingProxy(server.port).start()
    through_proxy = url.replace(f":{server.port}/", f":{proxy.port}/")
    key = ChannelKey("test", "chat")
    try:
        async with SQLStore(through_proxy, upgrade=True, max_retry_delay=0.01) as store:
            sender = RecordingSender()
            async with Runtime(chat, llm=echo_llm(), sender=sender, store=store) as runtime:
                proxy.cut_next_commit()  # the inbox commit of the first message
                await runtime.receive(IncomingMessage(key, "first", "m1"))
                await runtime.join()
                assert proxy.cuts == 1
                proxy.cut_next_commit()  # a step's commit
                await runtime.receive(IncomingMessage(key, "second", "m2"))
                await runtime.join()
                assert proxy.cuts == 2
                await runtime.receive(IncomingMessage(key, "third", "m3"))
                await runtime.join()
            # Every message answered once, nothing lost to a 'duplicate', the writer alive.
            assert sender.texts() == ["echo: first", "echo: second", "echo: third"]
            lines = await store.transcript(key)
            assert [line.text for line in lines] == [
                "first",
                "echo: first",
                "second",
                "echo: second",
                "third",
                "echo: third",
            ]
            assert (await store.recovery()).inbox == []
    finally:
        await proxy.stop()


def refusals(store: Any, words: str) -> Any:
    """An event set once a commit of ``store`` fails with ``words`` in its error."""
    import asyncio

    real_commit = store._commit
    refused = asyncio.Event()

    async def commit(batch: Any) -> Any:
        try:
            return await real_commit(batch)
        except Exception as exc:
            if words in str(exc):
                refused.set()
            raise

    store._commit = commit
    return refused


async def test_postgresql_refusing_writes_for_a_while_is_waited_out(
    request: pytest.FixtureRequest,
) -> None:
    """A read-only database (as after a failover; SQLSTATE 25006), like a full disk
    (53100), is the server's state, not a refused value: wait, lose nothing."""
    import asyncio

    import asyncpg

    from tests.conftest import _create_database
    from turbobot.sql import SQLStore

    server = request.getfixturevalue("postgres")
    url = await _create_database(server)
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")

    async def read_only(on: bool) -> None:
        await admin.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}'
        )
        # new sessions take the setting: end the store's current ones
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )

    store = SQLStore(url, upgrade=True, max_retry_delay=0.01)
    await store.open()
    refused = refusals(store, "read-only")
    try:
        async with ChatHarness(chat, llm=echo_llm(), store=store) as h:
            assert await h.say("before") == ["echo: before"]
            await read_only(True)
            during = asyncio.ensure_future(h.say("during"))
            await asyncio.wait_for(refused.wait(), 30)
            await read_only(False)
            assert await asyncio.wait_for(during, 30) == ["echo: during"]
            assert await h.say("after") == ["echo: after"]
    finally:
        await store.aclose()
        await admin.close()


async def test_a_sqlite_file_refusing_writes_for_a_while_is_waited_out(tmp_path: Any) -> None:
    """SQLite's own "attempt to write a readonly database" (here from ``query_only`` on
    the store's connection): wait, lose nothing, no restart."""
    import asyncio

    from turbobot.sql import SQLStore

    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", max_retry_delay=0.01)
    await store.open()
    assert store._sqlite is not None
    refused = refusals(store, "readonly")
    try:
        async with ChatHarness(chat, llm=echo_llm(), store=store) as h:
            assert await h.say("before") == ["echo: before"]
            store._sqlite.execute("PRAGMA query_only = ON")
            during = asyncio.ensure_future(h.say("during"))
            await asyncio.wait_for(refused.wait(), 30)
            store._sqlite.execute("PRAGMA query_only = OFF")
            assert await asyncio.wait_for(during, 30) == ["echo: during"]
            assert await h.say("after") == ["echo: after"]
            texts = [line.text for line in await store.transcript(h.key())]
        assert texts == ["before", "echo: before", "during", "echo: during", "after", "echo: after"]
    finally:
        await store.aclose()


# -- found by review: state after a failed retry or a failed store read ------------------


async def test_after_a_stalled_retry_succeeds_messages_keep_their_order() -> None:
    from turbobot import LLMError

    llm = ScriptedLLM(
        ["a1", LLMError("down"), LLMError("down again"), "a2", "a3", "a4", "answer to hello"]
    )
    async with ChatHarness(chat, llm=llm) as h:
        await h.say("m1")
        await h.say("m2")  # the generation fails: apology
        await h.say("m3")  # retried, fails again: the channel waits for news
        await h.say("m4")  # the retry succeeds
        before = len(h.sender.sent)
        await h.runtime.receive_many([h.message("hello"), h.message("/reset")])
        await h.runtime.join()
        # "hello" is answered before /reset acts: commands no longer jump the queue.
        assert h.sender.texts()[before:] == [
            "answer to hello",
            h.runtime.settings.notices.reset,
        ]


async def test_a_store_read_failing_while_resuming_keeps_the_waking_message_apart() -> None:
    import asyncio

    from turbobot import Assistant
    from turbobot.runtime import Runtime
    from turbobot.store import InMemoryStore
    from turbobot.template import AssistantStream
    from turbobot.testing import RecordingSender

    @turbo()
    async def greeter():
        yield Generate(stream=True)
        name = yield GetUserInput("Name?")
        yield Assistant(f"hi {name}")
        yield GetUserInput()

    class Hangs(RecordingSender):
        async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
            await asyncio.Event().wait()
            return None

    class FlakyLoad(InMemoryStore):
        fail = 0

        async def load_conversation(self, key: ChannelKey, template_ref: str | None = None) -> Any:
            if self.fail:
                self.fail -= 1
                raise OSError("db connection lost")
            return await super().load_conversation(key, template_ref)

    store = FlakyLoad()
    key = ChannelKey("test", "c")
    settings = RuntimeSettings(stop_grace=0.0, retry_delays=(0.0,))
    first = Runtime(
        greeter, llm=ScriptedLLM(["Hello!"]), sender=Hangs(), store=store, settings=settings
    )
    await first.receive(IncomingMessage(key, "hi", "m1"))
    for _ in range(20):
        await asyncio.sleep(0)  # let the step reach the stream
    await first.aclose()  # stopped mid-stream: the conversation is running, "hi" unused
    store.fail = 1
    sender = RecordingSender()
    runtime = Runtime(
        greeter, llm=ScriptedLLM(["Hello!"]), sender=sender, store=store, settings=settings
    )
    await runtime.start()
    for _ in range(50):  # the failed resume is retried (delay 0): no time passes
        await runtime.join()
        if sender.sent:
            break
        await asyncio.sleep(0)
    await runtime.join()
    await runtime.aclose()
    assert sender.texts() == ["Hello!", "Name?"]  # "hi" is not taken for the name


async def test_a_fault_while_a_refused_batch_is_split_commits_nothing_twice(
    tmp_path: Any,
) -> None:
    """The batch holds a refused value, so it is committed op by op; the disk fills up
    after the first op went through: the retry must not commit (or lose) it again."""
    import asyncio
    import sqlite3

    from turbobot.sql import SQLStore

    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 't.db'}", max_retry_delay=0.01)
    await store.open()
    real = store._commit
    calls = 0

    async def commit(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.IntegrityError("a refused value somewhere in the batch")
        if calls == 3:
            raise sqlite3.OperationalError("database or disk is full")
        return await real(batch)

    store._commit = commit  # type: ignore[method-assign]
    key = ChannelKey("t", "c")
    one, two = IncomingMessage(key, "one", "1"), IncomingMessage(key, "two", "2")
    try:
        seqs = await asyncio.gather(store.add_incoming_many([one]), store.add_incoming_many([two]))
        assert seqs[0] != [None] and seqs[1] != [None]  # both new, both scheduled
        assert [i.message.text for i in (await store.recovery()).inbox] == ["one", "two"]
    finally:
        await store.aclose()


async def test_the_admission_notice_is_sent_once_even_when_its_message_waits() -> None:
    from turbobot import LLMUnavailableError

    llm = ScriptedLLM(
        ["ok", LLMUnavailableError("down"), LLMUnavailableError("down"), "back", "long", "more"]
    )
    settings = RuntimeSettings(max_input_chars=10)
    async with ChatHarness(chat, llm=llm, settings=settings) as h:
        notices = h.runtime.settings.notices
        await h.say("hi")
        assert await h.say("m2") == [notices.apology]
        long = "x" * 50
        first = await h.say(long)  # the retry fails again: the long message waits
        assert first[0].startswith("Your message was too long") and first[1:] == [notices.apology]
        # The next message brings it back: answered now, without a second notice.
        again = await h.say("more")
        assert again == ["back", "long", "more"]  # no second notice
