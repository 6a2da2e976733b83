"""What is particular to SQLStore's write path on a SQLite file (the contract is elsewhere)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path

from turbobot import ChannelKey, JournalEntry
from turbobot.sql import SQLStore
from turbobot.sql.store import channel_column, parse_channel_column
from turbobot.store import ConversationRecord, OutgoingRecord, StepWrite, new_id

KEY = ChannelKey("test", "room")


def test_channel_column_is_the_json_text_rows_were_stored_with() -> None:
    keys = [
        ChannelKey("telegram", "-100123"),
        ChannelKey("discord", 'quo"te', "thread\\1", "üser\n\u2028\x00"),
        ChannelKey("x", "", None, "u"),
    ]
    for key in keys:
        assert channel_column(key) == json.dumps(list(key), ensure_ascii=False)
        assert parse_channel_column(channel_column(key)) == key


async def test_a_commit_waits_for_another_writer_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    async with SQLStore(f"sqlite+aiosqlite:///{path}") as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        outgoing = OutgoingRecord(new_id(), KEY, "waits for the lock")
        await store.write(StepWrite(outgoing=[outgoing]))
        flushed = asyncio.ensure_future(store.flush())
        ticks = []
        for _ in range(10):
            started = time.monotonic()
            await asyncio.sleep(0.02)
            ticks.append(time.monotonic() - started)
        assert not flushed.done()
        assert max(ticks) < 0.15, f"the event loop stalled: {max(ticks):.3f}s"
        other.execute("COMMIT")
        await asyncio.wait_for(flushed, timeout=5)
        other.close()
        assert [o.text for o in (await store.recovery()).unsent] == ["waits for the lock"]


async def test_journal_values_come_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "values.db"
    record = ConversationRecord(new_id(), KEY, "bots.x:bot", {"platform": "test"})
    record.status = "waiting"
    values = [2**70 + 1, {1: "int key"}, {"text": "ü", "n": [1.5, None, True]}, float("inf")]
    entries = [JournalEntry("step", value, f"c{n}") for n, value in enumerate(values)]
    async with SQLStore(f"sqlite+aiosqlite:///{path}") as store:
        await store.write(StepWrite(record=record, new_conversation=True, journal=entries))
    async with SQLStore(f"sqlite+aiosqlite:///{path}") as store:
        loaded = await store.load_conversation(KEY)
    assert loaded is not None
    assert [e.value for e in loaded.journal] == [2**70 + 1, {"1": "int key"}, values[2], values[3]]


async def test_a_writer_cancelled_during_commit_waits_for_it_and_commits_once(
    tmp_path: Path,
) -> None:
    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'cancelled.db'}")
    await store.open()
    assert store._sqlite is not None
    in_commit = threading.Event()

    def slow_fsync() -> int:  # SQLite calls this while it works; only slow the COMMIT
        thread = threading.current_thread().name
        if thread.startswith("turbobot-sqlite-commit") and not in_commit.is_set():
            in_commit.set()
            time.sleep(0.3)
        return 0

    store._sqlite.set_progress_handler(slow_fsync, 1)
    outgoing = OutgoingRecord(new_id(), KEY, "committed once")
    await store.write(StepWrite(outgoing=[outgoing]))
    flushed = asyncio.ensure_future(store.flush())
    assert await asyncio.to_thread(in_commit.wait, 5)
    writer = store._writer
    assert writer is not None
    writer.cancel()  # as asyncio.run() does to tasks left at shutdown
    await asyncio.wait([writer], timeout=5)
    assert writer.cancelled()
    assert store._failure is None
    assert store._sqlite is not None and not store._sqlite.in_transaction
    flushed.cancel()
    store._sqlite.set_progress_handler(None, 1)
    store._writer = None
    await store.aclose()
    async with SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'cancelled.db'}") as reopened:
        assert [o.text for o in (await reopened.recovery()).unsent] == ["committed once"]


async def test_a_new_database_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    import stat

    from turbobot import IncomingMessage

    path = tmp_path / "private.db"
    store = SQLStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    try:
        await store.add_incoming(IncomingMessage(ChannelKey("console", "x"), "secret?", "1"))
        for name in ("private.db", "private.db-wal", "private.db-shm"):
            mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
            assert mode & 0o077 == 0, f"{name}: {oct(mode)}"
    finally:
        await store.aclose()
