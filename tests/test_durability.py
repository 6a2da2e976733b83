"""Conversations that outlive their runtime: restart, eviction, deadlines, divergence.

Each test runs on every store; a "restart" closes the runtime and its store and opens
new ones on the same database, as a new process would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import StoreFactory
from tests.test_hardening import streaming_chat
from tests.test_runtime import echo_llm
from turbobot import (
    Generate,
    GetUserInput,
    LLMRequest,
    Result,
    ScriptedLLM,
    Step,
    System,
    User,
    turbo,
)
from turbobot.runtime import RuntimeSettings
from turbobot.store import OutgoingRecord, StepWrite, new_id
from turbobot.testing import ChatHarness, FakeClock


@turbo()
async def counter_chat():
    """Counts turns; its Step must not re-run on replay."""
    yield System("sys")
    turn = 0
    while True:
        text = yield GetUserInput()
        turn = yield Step(lambda n: n + 1, turn)
        yield User(f"{turn}: {text}")
        yield Generate()


def transcript_texts(lines: list[Any]) -> list[tuple[str, str]]:
    return [(line.role, line.text) for line in lines]


async def run_session(
    make_store: StoreFactory,
    llm: ScriptedLLM,
    texts: list[str],
    template: Any = counter_chat,
    channel: str = "chat",
    expect_divergence: bool = False,
    **settings: Any,
) -> list[str]:
    """Open a store and a runtime, say ``texts``, close both: one process's life."""
    store = await make_store()
    async with ChatHarness(
        template,
        llm=llm,
        store=store,
        settings=RuntimeSettings(**settings),
        expect_divergence=expect_divergence,
    ) as h:
        replies: list[str] = []
        for text in texts:
            replies += await h.say(text, channel=channel)
        return replies


async def test_restart_continues_as_if_uninterrupted(make_store: StoreFactory) -> None:
    texts = ["one", "two", "three", "four"]
    baseline_llm = echo_llm()
    baseline = await run_session(make_store, baseline_llm, texts, channel="baseline")
    llm = echo_llm()
    replies: list[str] = []
    for text in texts:  # a new process for every message
        replies += await run_session(make_store, llm, [text], channel="restarted")
    assert replies == baseline
    assert llm.calls == baseline_llm.calls == 4
    store = await make_store()
    key = ChatHarness(counter_chat, llm=llm).key
    restarted = transcript_texts(await store.transcript(key("restarted")))
    assert restarted == transcript_texts(await store.transcript(key("baseline")))
    assert restarted == [
        ("user", "one"),
        ("assistant", "echo: 1: one"),
        ("user", "two"),
        ("assistant", "echo: 2: two"),
        ("user", "three"),
        ("assistant", "echo: 3: three"),
        ("user", "four"),
        ("assistant", "echo: 4: four"),
    ]


async def test_eviction_and_rehydration(make_store: StoreFactory) -> None:
    closed: list[str] = []

    @turbo()
    async def tracked():
        try:
            while True:
                text = yield GetUserInput()
                yield User(text)
                yield Generate()
        finally:
            closed.append("closed")

    llm = echo_llm()
    store = await make_store()
    settings = RuntimeSettings(max_live=2)
    async with ChatHarness(tracked, llm=llm, store=store, settings=settings) as h:
        for n in range(5):
            await h.say(f"hello {n}", channel=f"c{n}")
        await h.runtime.join()
        assert h.runtime.live_count <= 2
        assert len(closed) >= 3, "evicted generators must be closed (finally runs)"
        calls = llm.calls
        assert await h.say("again", channel="c0") == ["echo: again"]
        assert llm.calls == calls + 1, "rehydration must not call the LLM"
        prompt = [m["content"] for m in llm.requests[-1].messages]
        assert prompt == ["hello 0", "echo: hello 0", "again"]


async def test_idle_conversations_are_evicted(make_store: StoreFactory) -> None:
    store = await make_store()
    settings = RuntimeSettings(idle_evict_seconds=0.1)
    async with ChatHarness(counter_chat, llm=echo_llm(), store=store, settings=settings) as h:
        await h.say("hi")
        assert h.runtime.live_count == 1
        await asyncio.sleep(0.3)
        assert h.runtime.live_count == 0
        assert await h.say("back") == ["echo: 2: back"]


@turbo()
async def patient():
    answer = yield GetUserInput("Ready?", timeout=0.5)
    yield Result("Too slow." if answer.timed_out else f"Got {answer}.")


async def test_deadline_fires_after_restart(make_store: StoreFactory) -> None:
    clock = FakeClock()
    store = await make_store()
    async with ChatHarness(patient, llm=echo_llm(), store=store, clock=clock) as h:
        assert await h.say("hi") == ["Ready?"]
    clock.advance(0.7)  # the deadline passes while nothing runs
    store = await make_store()
    async with ChatHarness(patient, llm=echo_llm(), store=store, clock=clock) as h:
        await h.settle()  # start() armed the overdue deadline: it fires at once
        assert h.texts() == ["Too slow."]


async def test_deadline_after_eviction(make_store: StoreFactory) -> None:
    store = await make_store()
    settings = RuntimeSettings(idle_evict_seconds=0.05)
    async with ChatHarness(patient, llm=echo_llm(), store=store, settings=settings) as h:
        assert await h.say("hi") == ["Ready?"]
        await asyncio.sleep(0.15)  # idle eviction runs on the event loop's time
        assert h.runtime.live_count == 0
        assert await h.advance(0.6) == ["Too slow."]
        assert h.texts() == ["Ready?", "Too slow."]


async def test_changed_template_restarts_with_notice(make_store: StoreFactory) -> None:
    # A structural change: v2 asks a question where v1 ran a step (issue 10: a change of
    # text alone no longer counts, see test_redeploy.py).
    @turbo()
    async def v1():
        name = yield GetUserInput("Name?")
        yield Step(lambda: "noted")
        yield GetUserInput(f"Hi {name}. Colour?")

    @turbo()
    async def v2():
        name = yield GetUserInput("What is your name?")
        yield GetUserInput(f"Hello {name}. Age?")
        yield GetUserInput("Colour?")

    v2.ref = v1.ref  # the same bot (module and name), redeployed with new code
    await run_session(make_store, echo_llm(), ["hi", "Ann"], template=v1)
    replies = await run_session(
        make_store, echo_llm(), ["blue"], template=v2, expect_divergence=True
    )
    assert replies == [
        "The bot was updated and could not resume our conversation, so it started a new one.",
        "What is your name?",
    ]
    store = await make_store()
    statuses = [c.status for c in await store.conversations()]
    assert statuses == ["diverged", "waiting"]


async def test_unsent_replies_are_sent_on_recovery(make_store: StoreFactory) -> None:
    store = await make_store()
    harness = ChatHarness(counter_chat, llm=echo_llm(), store=store)
    outgoing = OutgoingRecord(new_id(), harness.key(), "recorded before the crash")
    await store.write(StepWrite(outgoing=[outgoing]))
    await store.flush()
    async with harness as h:
        await h.runtime.start()  # sent by the channel's worker: start never waits on it
        await h.runtime.join()
        assert h.sender.texts() == ["recorded before the crash"]
    assert (await (await make_store()).recovery()).unsent == []


async def test_messages_committed_but_unhandled_are_processed_on_start(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    harness = ChatHarness(counter_chat, llm=echo_llm(), store=store)
    await store.add_incoming(harness.message("left in the inbox"))
    async with harness as h:
        await h.runtime.start()
        await h.runtime.join()
        assert h.sender.texts() == ["echo: 1: left in the inbox"]


async def test_failed_generation_retried_after_restart(make_store: StoreFactory) -> None:
    from turbobot import LLMUnavailableError

    def down(request: LLMRequest) -> LLMUnavailableError:
        return LLMUnavailableError("down")

    first = await run_session(make_store, ScriptedLLM(respond=down), ["one"])
    assert first == [
        "Sorry, I could not answer just now. Send another message and I will try again."
    ]
    llm = echo_llm()
    replies = await run_session(make_store, llm, ["two"])
    assert replies == ["echo: 1: one", "echo: 2: two"]


async def test_first_receives_wait_for_recovery(make_store: StoreFactory) -> None:
    # Regression: a receive racing the runtime's recovery could queue a message twice.
    store = await make_store()
    harness = ChatHarness(counter_chat, llm=echo_llm(), store=store)
    await store.add_incoming(harness.message("left over"))
    async with harness as h:
        await asyncio.gather(*(h.send(f"new {n}") for n in range(3)))
        await h.runtime.join()
        assert h.sender.texts() == [
            "echo: 1: left over",
            "echo: 2: new 0",
            "echo: 3: new 1",
            "echo: 4: new 2",
        ]


async def test_a_finished_stream_is_not_generated_again_after_a_crash(
    make_store: StoreFactory,
) -> None:
    """The process dies after the generation ended but before the adapter showed all of
    it (say its last, paced send): the reply is stored, so the next start sends it
    without asking the model again."""
    from turbobot import ChannelKey, IncomingMessage
    from turbobot.runtime import Runtime
    from turbobot.template import AssistantStream
    from turbobot.testing import RecordingSender

    key = ChannelKey("console", "streamed")

    class StuckAfterGenerating(RecordingSender):
        def __init__(self) -> None:
            super().__init__()
            self.generated = asyncio.Event()

        async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
            async for _ in stream:
                pass
            self.generated.set()
            await asyncio.Event().wait()  # the last send never returns: the process dies
            return None

    llm = ScriptedLLM(["the whole answer"])
    store = await make_store()
    sender = StuckAfterGenerating()
    runtime = Runtime(
        streaming_chat, llm=llm, sender=sender, store=store, settings=RuntimeSettings(stop_grace=0)
    )
    await runtime.start()
    await runtime.receive(IncomingMessage(key, "question", "m1"))
    await sender.generated.wait()
    for _ in range(1000):  # until the runtime has committed the generation (each load flushes)
        record = await store.load_conversation(key, streaming_chat.ref)
        if record is not None and any(e.kind == "generate" for e in record.journal):
            break
        await asyncio.sleep(0)
    else:
        raise AssertionError("the finished generation was never committed")
    await runtime.aclose()  # the step in flight is abandoned, as a crash leaves it

    store = await make_store()
    restarted = StuckAfterGenerating()
    async with Runtime(streaming_chat, llm=llm, sender=restarted, store=store) as runtime:
        await runtime.join()
    assert restarted.texts() == ["the whole answer"]
    assert len(llm.requests) == 1
