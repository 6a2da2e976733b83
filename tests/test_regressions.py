"""Regressions found by review, each named after what broke.

A "crash" here abandons a runtime mid-step (its worker cancelled, nothing closed) and
starts a new one on the same store, as a new process would after kill -9.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import StoreFactory
from tests.test_runtime import echo_llm
from turbobot import (
    ChannelKey,
    Generate,
    GetUserInput,
    IncomingMessage,
    LLMError,
    LLMRequest,
    Result,
    ScriptedLLM,
    UndeliverableError,
    User,
    turbo,
)
from turbobot.runtime import BaseSender, Runtime
from turbobot.testing import ChatHarness, RecordingSender

KEY = ChannelKey("test", "chat")


class HangingLLM:
    """Streams a fragment, then never finishes: the process dies during this call."""

    async def complete(self, request: LLMRequest, on_delta: Any = None) -> Any:
        if on_delta is not None:
            await on_delta("partial ")
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        return None


async def crash(runtime: Runtime) -> None:
    await asyncio.sleep(0.1)
    tasks = [task for _, task in runtime._workers.tasks()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@turbo()
async def chat():
    """Echoes what you say."""
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


async def test_caught_llm_error_is_not_journaled_twice_on_replay(make_store: StoreFactory) -> None:
    @turbo()
    async def forgiving():
        while True:
            text = yield GetUserInput()
            yield User(text)
            try:
                yield Generate()
            except LLMError:
                yield Result("fallback")

    store = await make_store()
    llm = ScriptedLLM([LLMError("boom"), "two", "three"])
    async with ChatHarness(forgiving, llm=llm, store=store) as h:
        assert await h.say("a") == ["fallback"]
        for text, answer in (("b", "two"), ("c", "three")):
            await h.runtime.evict(h.key())
            assert await h.say(text) == [answer]
        loaded = await store.load_conversation(h.key())
        assert loaded is not None and loaded.status == "waiting"
        assert [e.kind for e in loaded.journal] == [
            "input",
            "error",
            "input",
            "generate",
            "input",
            "generate",
        ]


async def test_first_message_survives_a_crash_during_its_generation(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    runtime = Runtime(chat, llm=HangingLLM(), sender=RecordingSender(), store=store)
    await runtime.receive(IncomingMessage(KEY, "hello", "m1"))
    await crash(runtime)
    sender = RecordingSender()
    async with Runtime(chat, llm=echo_llm(), sender=sender, store=await make_store()) as again:
        await again.join()
    assert sender.texts() == ["echo: hello"]


async def test_streamed_reply_interrupted_by_a_crash_is_sent_after_restart(
    make_store: StoreFactory,
) -> None:
    @turbo()
    async def streamer():
        while True:
            text = yield GetUserInput("ask me")
            yield User(text)
            yield Generate(stream=True)

    store = await make_store()
    runtime = Runtime(streamer, llm=HangingLLM(), sender=RecordingSender(), store=store)
    await runtime.receive(IncomingMessage(KEY, "hi", "m0"))
    await runtime.join()
    await runtime.receive(IncomingMessage(KEY, "question", "m1"))
    await crash(runtime)
    sender = RecordingSender()
    llm = ScriptedLLM(["THE ANSWER"])
    async with Runtime(streamer, llm=llm, sender=sender, store=await make_store()) as again:
        await again.join()
    assert sender.texts() == ["THE ANSWER", "ask me"]
    assert llm.calls == 1


async def test_failed_send_keeps_the_conversation_and_handles_each_message_once() -> None:
    class Down(BaseSender):
        async def send(self, key: ChannelKey, text: str) -> str | None:
            raise ConnectionError("network down")

    llm = echo_llm()
    runtime = Runtime(chat, llm=llm, sender=Down())
    for n, text in enumerate(("first", "second")):
        await runtime.receive(IncomingMessage(KEY, text, f"m{n}"))
        await runtime.join()
    assert llm.calls == 2
    (record,) = await runtime.store.conversations(KEY)
    assert record.status == "waiting"
    assert [o.text for o in (await runtime.store.recovery()).unsent] == [
        "echo: first",
        "echo: second",
    ]


async def test_an_undeliverable_reply_is_dropped_not_kept_in_the_outbox() -> None:
    class Blocked(BaseSender):
        async def send(self, key: ChannelKey, text: str) -> str | None:
            raise UndeliverableError("the user blocked the bot")

    runtime = Runtime(chat, llm=echo_llm(), sender=Blocked())
    await runtime.receive(IncomingMessage(KEY, "first", "m0"))
    await runtime.join()
    (record,) = await runtime.store.conversations(KEY)
    assert record.status == "waiting"  # the conversation goes on if they come back
    assert (await runtime.store.recovery()).unsent == []
    await runtime.aclose()


async def test_conversation_that_ends_while_rebuilt_after_a_crash(
    make_store: StoreFactory,
) -> None:
    @turbo()
    async def one_shot():
        text = yield GetUserInput()
        yield Result(f"done with {text}")

    class HangsOnFinalReply(RecordingSender):
        async def send(self, key: ChannelKey, text: str) -> str | None:
            await asyncio.Event().wait()  # the process dies while sending
            return None

    store = await make_store()
    runtime = Runtime(one_shot, llm=echo_llm(), sender=HangsOnFinalReply(), store=store)
    await runtime.receive(IncomingMessage(KEY, "x", "m0"))
    await crash(runtime)  # the reply is recorded; the end of the conversation is not
    sender = RecordingSender()
    async with Runtime(one_shot, llm=echo_llm(), sender=sender, store=await make_store()) as again:
        await again.join()
        await again.receive(IncomingMessage(KEY, "y", "m1"))
        await again.join()
    assert sender.texts() == ["done with x", "done with y"]
    statuses = [c.status for c in await (await make_store()).conversations(KEY)]
    assert statuses == ["finished", "finished"]


async def test_early_timer_is_rearmed() -> None:
    now = [1000.0]

    @turbo()
    async def patient():
        answer = yield GetUserInput("say something", timeout=0.2)
        yield Result("timed out" if answer.timed_out else "answered")

    sender = RecordingSender()
    runtime = Runtime(patient, llm=echo_llm(), sender=sender, clock=lambda: now[0])
    await runtime.receive(IncomingMessage(KEY, "hi", "m0"))
    await runtime.join()
    now[0] -= 0.05  # the wall clock steps back: the timer fires before the deadline
    await asyncio.sleep(0.3)
    await runtime.join()
    assert sender.texts() == ["say something"]
    now[0] += 1.0
    await asyncio.sleep(0.4)
    await runtime.join()
    assert sender.texts() == ["say something", "timed out"]
    await runtime.aclose()


async def test_failed_group_commit_leaves_no_waiter_hanging(tmp_path: Any) -> None:
    # Since issue 10 a refused write is dropped alone and the store goes on (see
    # test_hardening): flushes return, the refused message's sender gets the error.
    from turbobot.sql import SQLStore
    from turbobot.store import IncomingBatchError, OutgoingRecord, StepWrite, new_id

    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'broken.db'}")
    await store.open()

    async def broken(batch: Any) -> Any:
        await asyncio.sleep(0.05)  # others queue up meanwhile
        raise RuntimeError("disk on fire")

    store._commit = broken  # type: ignore[method-assign]
    await store.write(StepWrite(outgoing=[OutgoingRecord(new_id(), KEY, "x")]))
    first = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0.01)
    later = [store.add_incoming(IncomingMessage(KEY, "y", "m1")), store.flush()]
    results = await asyncio.wait_for(
        asyncio.gather(first, *later, return_exceptions=True), timeout=5
    )
    flushed, refused, flushed_later = results
    assert flushed is None and flushed_later is None, results
    assert isinstance(refused, IncomingBatchError)
    assert isinstance(refused.__cause__, RuntimeError)
    await store.aclose()


async def test_a_streamed_reply_that_cannot_be_sent_stays_in_the_outbox(
    make_store: StoreFactory,
) -> None:
    @turbo()
    async def streamer():
        while True:
            text = yield GetUserInput()
            yield User(text)
            yield Generate(stream=True)

    class GivesUpEarly(RecordingSender):
        """Streams fail (the network broke mid-stream); plain sends work."""

        async def send_stream(self, key: ChannelKey, stream: Any) -> str | None:
            async for _ in stream:
                raise ConnectionError("network down mid-stream")
            return None

    store = await make_store()
    llm = ScriptedLLM(["THE WHOLE ANSWER"])
    sender = GivesUpEarly()
    async with Runtime(streamer, llm=llm, sender=sender, store=store) as runtime:
        await runtime.receive(IncomingMessage(KEY, "question", "m0"))
        await runtime.join()
        # Kept in the outbox and sent again without a restart (issue 10, defect 3).
        assert sender.texts() == ["THE WHOLE ANSWER"]
        assert (await store.recovery()).unsent == []
    assert llm.calls == 1
