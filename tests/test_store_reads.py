"""Reading conversations back from a SQLite file: on the store's own read connection,
waiting only for the writes queued for the channel read (docs/architecture.md,
"Storage encoding"), and many conversations coming back from eviction at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from turbobot import ChannelKey, GetUserInput, IncomingMessage, Result, ScriptedLLM, turbo
from turbobot.journal import JournalEntry
from turbobot.runtime import Runtime, RuntimeSettings
from turbobot.sql import SQLStore
from turbobot.store import ConversationRecord, StepWrite, new_id
from turbobot.testing import RecordingSender

A = ChannelKey("test", "a")
B = ChannelKey("test", "b")


def started(key: ChannelKey) -> StepWrite:
    record = ConversationRecord(new_id(), key, "bots.x:bot", {"platform": "test"}, "waiting")
    entry = JournalEntry("input", {"text": f"hello from {key.channel}"}, "c0")
    return StepWrite(record=record, new_conversation=True, journal=[entry])


async def test_a_read_waits_for_its_own_channel_and_not_for_the_others(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'reads.db'}")
    await store.open()
    try:
        await store.write(started(B))
        await store.flush()
        release = asyncio.Event()
        commit = store._commit

        async def held(ops: list) -> dict:  # type: ignore[type-arg]
            await release.wait()
            return await commit(ops)

        store._commit = held  # type: ignore[method-assign]
        await store.write(started(A))  # queued: its commit is held back
        # B has nothing queued: read at once, while A's commit waits
        other = await asyncio.wait_for(store.load_conversation(B), 5)
        assert other is not None and other.key == B
        assert other.journal[0].value == {"text": "hello from b"}
        # A's read waits for A's write, then sees it
        reading = asyncio.ensure_future(store.load_conversation(A))
        await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not reading.done()
        release.set()
        mine = await asyncio.wait_for(reading, 5)
        assert mine is not None and mine.key == A and mine.status == "waiting"
        assert mine.journal[0].value == {"text": "hello from a"}
    finally:
        await store.aclose()


@turbo()
async def twostep():  # type: ignore[no-untyped-def]
    name = yield GetUserInput("What's your name?")
    yield Result(f"Hello {name}")


@pytest.mark.parametrize("cap", [1, 25])
async def test_conversations_come_back_from_eviction_many_at_once(tmp_path: Path, cap: int) -> None:
    """300 conversations wait with at most ``cap`` in RAM; their second messages come
    in pages of 100, so up to 100 conversations load at once: each gets its answer."""
    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'evict.db'}")
    await store.open()
    sender = RecordingSender()
    settings = RuntimeSettings(idle_evict_seconds=None, max_live=cap)
    runtime = Runtime(twostep, llm=ScriptedLLM(), sender=sender, store=store, settings=settings)
    chats = 300
    async with runtime:
        for text in ("hi", None):
            for start in range(0, chats, 100):
                page = [
                    IncomingMessage(
                        ChannelKey("test", str(i)), text or f"name{i}", f"{i}-{text is None}"
                    )
                    for i in range(start, start + 100)
                ]
                await runtime.receive_many(page)
            await runtime.join()
            assert runtime.live_count <= cap
        assert runtime.conversations.evictions >= chats - cap
    await store.aclose()
    got: dict[str, list[str]] = {}
    for key, text in sender.sent:
        got.setdefault(key.channel, []).append(text)
    assert got == {str(i): ["What's your name?", f"Hello name{i}"] for i in range(chats)}
