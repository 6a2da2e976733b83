"""An input is stored once (issue 10): the inbox row holds it; the journal's input entry
and the transcript's user line refer to it. Rows written before migration 0002 keep
their own copies and load as before; a downgrade gives the copies back."""

from __future__ import annotations

import json

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from turbobot import ChannelKey, Generate, GetUserInput, IncomingMessage, ScriptedLLM, User, turbo
from turbobot.runtime import Runtime
from turbobot.sql import SQLStore
from turbobot.sql.migrate import alembic_config, upgrade_schema
from turbobot.sql.store import channel_column
from turbobot.testing import RecordingSender

KEY = ChannelKey("console", "once")
OTHER = ChannelKey("console", "later")
CHANNEL = channel_column(KEY)


@turbo()
async def echo_chat():
    while True:
        said = yield GetUserInput()
        yield User(said)
        yield Generate()


async def _talk(
    url: str, texts: list[str], replies: list[str], key: ChannelKey = KEY
) -> RecordingSender:
    store = SQLStore(url, upgrade=True)
    await store.open()
    sender = RecordingSender()
    llm = ScriptedLLM(replies)
    try:
        async with Runtime(echo_chat, llm=llm, sender=sender, store=store) as runtime:
            for number, said in enumerate(texts, 1):
                await runtime.receive(IncomingMessage(key, said, f"id-{number}-{len(texts)}"))
                await runtime.join()
    finally:
        await store.aclose()
    return sender


async def _rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(query))]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_an_input_is_stored_once_and_replays_from_its_inbox_row(store_url: str) -> None:
    hostile = "zero\x00width \ud800 and \u202eRTL"  # stored writable (see turbobot.codec)
    marker = "UNIQUE-MARKER-4711"
    await _talk(store_url, ["hello", f"{marker} {hostile}"], ["r1", "r2"])

    # the marker's text is in the inbox row and nowhere else
    for table, column in [
        ("inbox", "payload"),
        ("journal", "value"),
        ("messages", "text"),
        ("conversations", "context"),
    ]:
        found = await _rows(store_url, f"SELECT {column} FROM {table}")
        hits = sum(marker in str(value) for (value,) in found)
        assert hits == (1 if table == "inbox" else 0), (table, found)
    inputs = await _rows(store_url, "SELECT value, message_id FROM journal WHERE kind = 'input'")
    assert inputs and all(value == "null" and message_id for value, message_id in inputs)

    # a restart replays from the inbox: the conversation goes on where it was, with the
    # model's memory holding both earlier inputs as the template saw them
    llm_replies = ["r3"]
    store = SQLStore(store_url)
    await store.open()
    sender = RecordingSender()
    llm = ScriptedLLM(llm_replies)
    try:
        async with Runtime(echo_chat, llm=llm, sender=sender, store=store) as runtime:
            await runtime.receive(IncomingMessage(KEY, "third", "id-3"))
            await runtime.join()
        transcript = await store.transcript(KEY)
    finally:
        await store.aclose()
    assert sender.texts(KEY) == ["r3"]
    prompt = [m["content"] for m in llm.requests[0].messages if m["role"] == "user"]
    assert prompt[0] == "hello"
    assert prompt[1].startswith(marker) and "\x00" not in prompt[1]
    assert prompt[2] == "third"
    users = [line.text for line in transcript if line.role == "user"]
    assert users == prompt
    assert [line.message_id for line in transcript if line.role == "user"] == [
        "id-1-2",
        "id-2-2",
        "id-3",
    ]


async def seed_0001(url: str) -> dict[str, object]:
    """A database at revision 0001 holding what a turbobot of then wrote: a conversation
    waiting after one input. Returns that input's message dict."""
    engine = create_async_engine(url)
    incoming = IncomingMessage(KEY, "old text", "old-1", timestamp=5.0).to_dict()
    payload = json.dumps(incoming)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade_schema, "0001")
            # what a turbobot before 0002 wrote: a conversation waiting after one input
            context = json.dumps({"platform": "console", "key": KEY.to_dict(), "settings": {}})
            await conn.execute(
                text(
                    "INSERT INTO conversations VALUES "
                    "('c1', :ch, :ref, :ctx, 'waiting', 4, NULL, :no, 1.0, NULL)"
                ),
                {"ch": CHANNEL, "ref": echo_chat.ref, "ctx": context, "no": False},
            )
            await conn.execute(
                text(
                    "INSERT INTO inbox (channel, message_id, payload, received_at, consumed) "
                    "VALUES (:ch, 'old-1', :p, 5.0, :yes)"
                ),
                {"ch": CHANNEL, "p": payload, "yes": True},
            )
            value = json.dumps({"text": "old text", "incoming": incoming})
            await conn.execute(
                text("INSERT INTO journal VALUES ('c1', 0, 'input', :v, '')"), {"v": value}
            )
            await conn.execute(
                text(
                    "INSERT INTO messages (conversation_id, channel, role, text, at) "
                    "VALUES ('c1', :ch, 'user', 'old text', 5.0)"
                ),
                {"ch": CHANNEL},
            )
    finally:
        await engine.dispose()
    return incoming


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_rows_from_before_0002_load_and_a_downgrade_restores_the_copies(
    store_url: str,
) -> None:
    url = store_url
    incoming = await seed_0001(url)
    store = SQLStore(url, upgrade=True)
    await store.open()
    try:
        record = await store.load_conversation(KEY, echo_chat.ref)
        assert record is not None
        assert record.journal[0].value == {"text": "old text", "incoming": incoming}
        assert [line.text for line in await store.transcript(KEY)] == ["old text"]
    finally:
        await store.aclose()

    # new rows by reference, then a downgrade: both old and new rows hold their copies
    await _talk(url, ["new text"], ["r"], key=OTHER)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0001"))
    finally:
        await engine.dispose()
    values = await _rows(url, "SELECT value FROM journal WHERE kind = 'input' ORDER BY value")
    texts = sorted(json.loads(value)["text"] for (value,) in values)
    assert texts == ["new text", "old text"]
    lines = await _rows(url, "SELECT text FROM messages WHERE role = 'user' ORDER BY id")
    assert [t for (t,) in lines] == ["old text", "new text"]
