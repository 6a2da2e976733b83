"""turbobot on the anchors' two-step conversation workload.

usage: python bench/bench_turbobot.py CHATS [memory|sqlite|sqlite-normal|postgres]

Each of CHATS private channels sends "hi" (the bot asks "What's your name?") and
then a name (the bot answers "Hello NAME" and the template ends). Messages go
through ``Runtime.receive_many``, the path the adapters use: each is committed to the
inbox before it is handled, and each reply only leaves after the step that produced
it is committed. Updates arrive in batches of 100 (what one Telegram getUpdates
returns), each batch received at once as the polling adapter does; the LLM is not
involved (the template only asks and answers), so this measures the framework.

memory         InMemoryStore: nothing survives a restart (compare with PTB memory)
sqlite         SQLStore on a real file, WAL, synchronous=FULL (the default)
sqlite-normal  the same with synchronous=NORMAL (survives a process crash, not power loss)
postgres       SQLStore on PostgreSQL at BENCH_POSTGRES_URL
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "anchors"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib as B

from turbobot import ChannelKey, GetUserInput, IncomingMessage, Result, ScriptedLLM, turbo
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.store import BaseStore, InMemoryStore

BATCH = 100
LOG = B.ReplyLog()


@turbo()
async def twostep():
    name = yield GetUserInput(B.ASK_TEXT)
    yield Result(f"Hello {name}")


class StubSender(BaseSender):
    def __init__(self) -> None:
        self.count = 0

    async def send(self, key: ChannelKey, text: str) -> str | None:
        LOG.record(int(key.channel), text)
        self.count += 1
        return str(self.count)


def message(i: int, update_id: int, text: str) -> IncomingMessage:
    uid = B.BASE_ID + i
    return IncomingMessage(
        ChannelKey("telegram", str(uid)),
        text,
        str(update_id),
        author_id=str(uid),
        author_name=f"U{i}",
        timestamp=1700000000.0,
    )


def make_store(variant: str) -> tuple[BaseStore, str | None]:
    if variant == "memory":
        return InMemoryStore(), None
    from turbobot.sql import SQLStore

    if variant in ("sqlite", "sqlite-normal"):
        path = B.fresh_path("turbobot.db")
        synchronous = "NORMAL" if variant == "sqlite-normal" else "FULL"
        window = float(os.environ.get("BENCH_BATCH_WINDOW", "0"))
        url = f"sqlite+aiosqlite:///{path}"
        return SQLStore(url, sqlite_synchronous=synchronous, batch_window=window), path
    if variant == "postgres":
        return SQLStore(os.environ["BENCH_POSTGRES_URL"], upgrade=True), None
    sys.exit(f"unknown variant {variant}")


def take_database(path: str) -> int:
    """The bytes of the SQLite file at ``path`` and its WAL, then the files removed
    (a pass of make bench writes gigabytes of them)."""
    size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return size


async def feed(runtime: Runtime, ids: range, make: Callable[[int], IncomingMessage]) -> None:
    """One message per id, received a batch at a time (each batch built when it is sent)."""
    for start in range(0, len(ids), BATCH):
        await runtime.receive_many([make(i) for i in ids[start : start + BATCH]])
    await runtime.join()


async def main(chats: int, variant: str) -> None:
    store, path = make_store(variant)
    await store.open()
    settings = RuntimeSettings(idle_evict_seconds=None, gc_threshold=10_000)
    runtime = Runtime(
        twostep, llm=ScriptedLLM(), sender=StubSender(), store=store, settings=settings
    )
    await runtime.start()

    await feed(runtime, B.WARMUP_IDS, lambda i: message(i, 10**9 + i, "hi"))
    await feed(runtime, B.WARMUP_IDS, lambda i: message(i, 2 * 10**9 + i, B.name_for(i)))
    assert len(LOG.sent) == 2 * B.WARMUP, len(LOG.sent)
    LOG.reset()
    gc.collect()

    rss_base = B.rss_mb()
    t = B.Timer()
    t.start()
    await feed(runtime, range(chats), lambda i: message(i, i + 1, "hi"))
    t.mark("phase1")
    rss_waiting = B.rss_mb()
    waiting = runtime.live_count
    await feed(runtime, range(chats), lambda i: message(i, chats + i + 1, B.name_for(i)))
    await store.flush()
    t.mark("end")
    await runtime.aclose()
    await store.aclose()
    extra: dict[str, object] = {"waiting_seen": waiting}
    if path:
        extra["db_bytes"] = take_database(path)
    B.emit(
        "turbobot",
        variant,
        chats,
        t.marks["end"],
        LOG.verify(chats) and waiting == chats,
        rss_base,
        rss_waiting,
        t.cpu_marks["end"],
        **extra,
    )


if __name__ == "__main__":
    c = B.parse_chats()
    v = sys.argv[2] if len(sys.argv) > 2 else "memory"
    asyncio.run(main(c, v))
