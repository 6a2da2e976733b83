"""A million open conversations on one small machine (issue 16).

usage: python bench/bench_million.py [CHATS=1000000] [MAX_LIVE=10000]

The two-step workload of ``bench_turbobot.py`` at scale, durable (SQLite WAL,
synchronous=FULL) with eviction on (``RuntimeSettings.max_live``): CHATS private
channels each send "hi" and are left waiting for their name; then each sends its name
and must get "Hello NAME" back. Only MAX_LIVE conversations stay in RAM; the others
wait in the database and come back by replay when their message arrives.

Every reply is checked as it is sent (a byte per chat, not a log of two million
replies, so the check does not weigh on the RSS it measures). Prints one JSON line:
msgs/s per phase, peak RSS (ru_maxrss), RSS while all wait, database size.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "anchors"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib as B
from bench_turbobot import BATCH, message, take_database, twostep

from turbobot import ChannelKey, ScriptedLLM
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.sql import SQLStore


class CheckingSender(BaseSender):
    """Checks each reply against what its chat should get next; keeps one byte a chat."""

    def __init__(self, chats: int) -> None:
        self.state = bytearray(chats)  # 0 nothing yet, 1 asked, 2 greeted, 255 wrong
        self.sent = 0
        self.wrong = 0

    async def send(self, key: ChannelKey, text: str) -> str | None:
        i = int(key.channel) - B.BASE_ID
        self.sent += 1
        if 0 <= i < len(self.state):
            step = self.state[i]
            if step == 0 and text == B.ASK_TEXT:
                self.state[i] = 1
            elif step == 1 and text == f"Hello {B.name_for(i)}":
                self.state[i] = 2
            else:
                self.state[i] = 255
                self.wrong += 1
        return str(self.sent)


async def feed(runtime: Runtime, chats: int, offset: int, text: str | None) -> None:
    for start in range(0, chats, BATCH):
        ids = range(start, min(start + BATCH, chats))
        await runtime.receive_many([message(i, offset + i, text or B.name_for(i)) for i in ids])
    await runtime.join()


async def main(chats: int, max_live: int) -> None:
    path = B.fresh_path("million.db")
    store = SQLStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    sender = CheckingSender(chats)
    settings = RuntimeSettings(idle_evict_seconds=None, gc_threshold=10_000, max_live=max_live)
    runtime = Runtime(twostep, llm=ScriptedLLM(), sender=sender, store=store, settings=settings)
    await runtime.start()
    gc.collect()
    rss_base = B.rss_mb()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await feed(runtime, chats, 1, "hi")
    wall1, cpu1 = time.perf_counter(), time.process_time()
    await store.flush()
    gc.collect()
    rss_waiting = B.rss_mb()
    waiting = sum(1 for s in sender.state if s == 1)
    peak_waiting = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    wall2, cpu2 = time.perf_counter(), time.process_time()
    await feed(runtime, chats, chats + 1, None)
    await store.flush()
    wall3, cpu3 = time.perf_counter(), time.process_time()
    greeted = sum(1 for s in sender.state if s == 2)
    live = runtime.live_count
    await runtime.aclose()
    await store.aclose()
    db_bytes = take_database(path)
    B.emit(
        "turbobot",
        f"million sqlite max_live={max_live}",
        chats,
        (wall1 - wall0) + (wall3 - wall2),
        waiting == chats and greeted == chats and sender.wrong == 0,
        rss_base,
        rss_waiting,
        (cpu1 - cpu0) + (cpu3 - cpu2),
        phase1_msgs_per_s=round(chats / (wall1 - wall0), 1),
        phase2_msgs_per_s=round(chats / (wall3 - wall2), 1),
        waiting_seen=waiting,
        greeted=greeted,
        wrong=sender.wrong,
        live_at_end=live,
        peak_rss_waiting_mb=round(peak_waiting, 1),
        db_bytes=db_bytes,
    )


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    cap = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    asyncio.run(main(n, cap))
