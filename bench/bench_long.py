"""One long console-style conversation: does a turn get dearer as the conversation grows?

usage: python bench/bench_long.py [TURNS] [memory|sqlite|sqlite-normal|sqlite-off] [window-only]

A chat template (input, User, Generate, repeat) runs TURNS turns in one channel with
a scripted LLM that answers at once, through ``Runtime.receive`` one message at a
time (as the console does). Reported: turns per second over each tenth of the run
(the last one is "at turn TURNS"), the RSS growth per turn, then, on SQLite, the time
to rehydrate the conversation (load its journal and replay it) and the replay cost
per journal entry. With ``window-only`` the template's memory is
``LocalMemory(window_only=True)`` (RAM: the window, not the history). These are the
targets of issue 10's "Long conversations stay cheap"; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turbobot import (
    ChannelKey,
    Generate,
    GetUserInput,
    IncomingMessage,
    LLMRequest,
    LocalMemory,
    User,
    turbo,
)
from turbobot.llm.base import LLMResponse
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings
from turbobot.store import BaseStore, InMemoryStore

KEY = ChannelKey("console", "long")


#: a small model's window (a local model's is 2,048): the prompt is the last few hundred
#: turns, whatever the conversation's length
@turbo(model="gpt-4o-mini", context_window=8192, max_tokens=256)
async def chat():
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


if "window-only" in sys.argv[3:]:
    chat = chat.configure({"memory": LocalMemory(window_only=True)})


class Counter(BaseSender):
    def __init__(self) -> None:
        self.sent = 0

    async def send(self, key: ChannelKey, text: str) -> str | None:
        self.sent += 1
        return None


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class InstantLLM:
    """Answers at once and keeps nothing (ScriptedLLM keeps every request)."""

    async def complete(self, request: LLMRequest, *, on_delta: object = None) -> LLMResponse:
        return LLMResponse(f"ok {len(request.messages)}", (), None, "stop")

    async def aclose(self) -> None:
        return None


def llm() -> InstantLLM:
    return InstantLLM()


async def run(turns: int, store_kind: str, path: Path) -> None:
    store: BaseStore
    if store_kind.startswith("sqlite"):
        from turbobot.sql import SQLStore

        # FULL (the default): an fsync per commit; NORMAL: at checkpoints; OFF: none, to
        # show what a turn costs in CPU alone
        synchronous = {"sqlite-normal": "NORMAL", "sqlite-off": "OFF"}.get(store_kind, "FULL")
        store = SQLStore(f"sqlite+aiosqlite:///{path}", sqlite_synchronous=synchronous)
    else:
        store = InMemoryStore()
    await store.open()
    sender = Counter()
    settings = RuntimeSettings(idle_evict_seconds=None, gc_threshold=10_000)
    runtime = Runtime(chat, llm=llm(), sender=sender, store=store, settings=settings)
    await runtime.start()
    step = max(1, turns // 10)
    summary: dict[str, object] = {"bench": "long", "store": store_kind, "turns": turns}
    # One turn first: the tokenizer's tables (~75 MB, loaded at the first count) are
    # not RAM a turn costs. That turn is not counted in the figures.
    await runtime.receive(IncomingMessage(KEY, "warm-up", "m0"))
    await runtime.join()
    gc.collect()
    rss0, blocks0 = rss_kb(), sys.getallocatedblocks()
    started = time.perf_counter()
    mark = started
    for i in range(1, turns + 1):
        await runtime.receive(IncomingMessage(KEY, f"message number {i}", f"m{i}"))
        await runtime.join()
        if i % step == 0:
            now = time.perf_counter()
            print(f"turns {i - step + 1:>6}-{i:<6} {step / (now - mark):>8.0f} turns/s")
            summary["turns_per_s_last_tenth"] = round(step / (now - mark), 1)
            mark = now
    total = time.perf_counter() - started
    assert sender.sent == turns + 1, sender.sent
    gc.collect()
    grown, blocks = rss_kb() - rss0, sys.getallocatedblocks() - blocks0
    print(
        f"{turns} turns in {total:.1f}s; RSS grew {grown / 1024:.1f} MB "
        f"({grown * 1024 / turns:.0f} B/turn); Python objects: {blocks / turns:.1f} "
        "blocks/turn"
    )
    summary["rss_bytes_per_turn"] = round(grown * 1024 / turns)
    live = runtime.conversations.live.get(KEY)
    if live is not None and live.app is not None:
        memory = getattr(live.app.memory, "messages", [])
        print(f"live conversation: {len(live.app.journal)} journal entries, {len(memory)} messages")
    await runtime.aclose()
    if not store_kind.startswith("sqlite"):
        await store.aclose()
        print(json.dumps(summary), flush=True)
        return
    await store.aclose()
    from turbobot.sql import SQLStore

    store = SQLStore(f"sqlite+aiosqlite:///{path}")
    await store.open()
    gc.collect()
    # Five rehydrations, the median reported (this machine's timings vary by 1.5x).
    rounds: list[tuple[float, float]] = []
    for _ in range(5):
        t0 = time.perf_counter()
        record = await store.load_conversation(KEY)
        t1 = time.perf_counter()
        assert record is not None
        app = chat().bind(
            llm=llm(), replay=list(record.journal), replay_until=record.yields, stopped_waiting=True
        )
        output = await app.asend(None)
        t2 = time.perf_counter()
        assert isinstance(output, GetUserInput) and not app.replaying
        await app.aclose()
        rounds.append((t1 - t0, t2 - t1))
        entries = len(record.journal)
    load = statistics.median(r[0] for r in rounds)
    replay = statistics.median(r[1] for r in rounds)
    total = statistics.median(r[0] + r[1] for r in rounds)
    print(
        f"rehydrate (median of 5): load {entries} journal entries {1000 * load:.0f} ms, "
        f"replay {1000 * replay:.0f} ms ({1e6 * replay / entries:.1f} us/entry), total "
        f"{1000 * total:.0f} ms"
    )
    await store.aclose()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")
    summary.update(
        journal_entries=entries,
        rehydrate_load_ms=round(1000 * load, 1),
        rehydrate_replay_ms=round(1000 * replay, 1),
        rehydrate_ms=round(1000 * total, 1),
        replay_us_per_entry=round(1e6 * replay / entries, 2),
        peak_rss_mb=round(peak, 1),
    )
    print(json.dumps(summary), flush=True)


def main() -> None:
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    kind = sys.argv[2] if len(sys.argv) > 2 else "sqlite"
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(turns, kind, Path(tmp) / "long.db"))


if __name__ == "__main__":
    main()
