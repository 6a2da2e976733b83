"""One contract for every store: in memory, SQLite (a real file), PostgreSQL (a real server)."""

from __future__ import annotations

import asyncio

from tests.conftest import StoreFactory
from turbobot import ChannelKey, IncomingMessage, JournalEntry
from turbobot.store import ConversationRecord, OutgoingRecord, StepWrite, TranscriptLine, new_id

KEY = ChannelKey("test", "room", thread="t1")
OTHER = ChannelKey("test", "other")


def incoming(text: str, message_id: str, key: ChannelKey = KEY) -> IncomingMessage:
    return IncomingMessage(key, text, message_id, author_id="u1", author_name="Ann")


def record(key: ChannelKey = KEY) -> ConversationRecord:
    return ConversationRecord(new_id(), key, "bots.x:bot", {"platform": key.platform})


async def test_incoming_is_deduplicated_and_ordered(make_store: StoreFactory) -> None:
    store = await make_store()
    original = incoming("a", "1")
    first = await store.add_incoming(original)
    second = await store.add_incoming(incoming("b", "2"))
    assert first is not None and second is not None and second > first
    assert await store.add_incoming(incoming("a again", "1")) is None
    assert await store.add_incoming(incoming("same id, other channel", "1", OTHER)) is not None
    inbox = (await store.recovery()).inbox
    assert [(i.message.text, i.message.key) for i in inbox] == [
        ("a", KEY),
        ("b", KEY),
        ("same id, other channel", OTHER),
    ]
    assert inbox[0].message == original


async def test_concurrent_duplicates_commit_once(make_store: StoreFactory) -> None:
    store = await make_store()
    results = await asyncio.gather(*(store.add_incoming(incoming("x", "dup")) for _ in range(5)))
    assert sum(r is not None for r in results) == 1


async def test_a_batch_of_incoming_keeps_its_order_and_skips_duplicates(
    make_store: StoreFactory,
) -> None:
    store = await make_store()
    await store.add_incoming(incoming("seen before", "0"))
    batch = [
        incoming("a", "1"),
        incoming("dup of seen", "0"),
        incoming("b", "2", OTHER),
        incoming("dup within the batch", "1"),
        incoming("c", "3"),
    ]
    seqs = await store.add_incoming_many(batch)
    assert [s is not None for s in seqs] == [True, False, True, False, True]
    kept = [s for s in seqs if s is not None]
    assert kept == sorted(kept)
    inbox = (await store.recovery()).inbox
    assert [i.message.text for i in inbox] == ["seen before", "a", "b", "c"]
    assert [i.seq for i in inbox[1:]] == kept
    assert await store.add_incoming_many([]) == []


async def test_step_roundtrip_and_consumption(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.add_incoming(incoming("hello", "m1"))
    conversation = record()
    conversation.status = "waiting"
    conversation.yields = 4
    conversation.deadline = 1234.5
    entries = [
        JournalEntry("input", {"text": "hello"}, "c1"),
        JournalEntry("generate", {"a": 1}, "c2"),
    ]
    outgoing = OutgoingRecord(new_id(), KEY, "hi!")
    await store.write(
        StepWrite(
            record=conversation,
            new_conversation=True,
            journal=entries,
            consumed=[(KEY, "m1")],
            transcript=[
                TranscriptLine(conversation.id, "user", "hello", 1.0),
                TranscriptLine(conversation.id, "assistant", "hi!", 2.0, 10, 3),
            ],
            outgoing=[outgoing],
        )
    )
    await store.flush()
    loaded = await store.load_conversation(KEY)
    assert loaded is not None
    assert (loaded.id, loaded.status, loaded.yields, loaded.deadline) == (
        conversation.id,
        "waiting",
        4,
        1234.5,
    )
    assert loaded.context == {"platform": "test"} and loaded.template_ref == "bots.x:bot"
    assert loaded.journal == entries
    recovery = await store.recovery()
    assert recovery.inbox == []
    assert recovery.active == {KEY}
    assert recovery.deadlines == [(KEY, 1234.5)]
    assert [(o.id, o.text, o.key) for o in recovery.unsent] == [(outgoing.id, "hi!", KEY)]
    lines = await store.transcript(KEY)
    assert [(line.role, line.text, line.completion_tokens) for line in lines] == [
        ("user", "hello", None),
        ("assistant", "hi!", 3),
    ]

    await store.write(StepWrite(sent=[(outgoing.id, "p-77")]))
    conversation.status = "finished"
    conversation.deadline = None
    await store.write(
        StepWrite(
            record=conversation, journal=[JournalEntry("input", "bye", "c3")], journal_start=2
        )
    )
    await store.flush()
    recovery = await store.recovery()
    assert recovery.unsent == [] and recovery.active == set() and recovery.deadlines == []
    assert await store.load_conversation(KEY) is None
    (stored,) = await store.conversations(KEY)
    assert stored.status == "finished"


async def test_steps_are_committed_in_order(make_store: StoreFactory) -> None:
    store = await make_store()
    conversation = record()
    await store.write(StepWrite(record=conversation, new_conversation=True))
    for n in range(50):
        conversation.yields = n
        await store.write(
            StepWrite(
                record=conversation, journal=[JournalEntry("step", n, f"c{n}")], journal_start=n
            )
        )
    loaded = await store.load_conversation(KEY)
    assert loaded is not None and loaded.yields == 49
    assert [e.value for e in loaded.journal] == list(range(50))


async def test_state_survives_reopening(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.add_incoming(incoming("kept", "k1"))
    conversation = record()
    await store.write(StepWrite(record=conversation, new_conversation=True))
    await store.aclose()
    reopened = await make_store()
    assert await reopened.add_incoming(incoming("kept", "k1")) is None
    recovery = await reopened.recovery()
    assert [i.message.text for i in recovery.inbox] == ["kept"]
    assert recovery.active == {KEY}
