"""Rehydration by replay, and group-commit throughput.

usage: python bench/bench_durability.py

1. Replay: a 100-turn conversation (100 inputs, 100 generations) is rebuilt from its
   journal, from RAM and from an SQLite file (load + replay), 50 times each.
2. Group commit: N channels (1, 100, 1,000) each run durable steps back to back, as
   the runtime does for a reply (write the step, wait for its commit), on SQLite
   (WAL, synchronous=FULL) for 3 seconds; prints steps/s and transactions/s.
"""

from __future__ import annotations

import asyncio
import json
import os
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
    JournalEntry,
    LLMRequest,
    ScriptedLLM,
    System,
    User,
    turbo,
)
from turbobot.sql import SQLStore
from turbobot.store import ConversationRecord, StepWrite, new_id


@turbo()
async def chat():
    yield System("You are a helpful assistant.")
    while True:
        text = yield GetUserInput()
        yield User(text)
        yield Generate()


def echo(request: LLMRequest) -> str:
    return f"echo: {request.messages[-1]['content']}"


async def build(turns: int) -> tuple[list[JournalEntry], int]:
    app = chat().bind(llm=ScriptedLLM(respond=echo))
    await app.asend(None)
    for n in range(turns):
        await app.asend(f"message number {n}, with a few words in it")
        await app.asend(None)  # past the forwarded reply, to the next GetUserInput
    return list(app.journal), app.yields


async def replay(journal: list[JournalEntry], yields: int) -> float:
    start = time.perf_counter()
    app = chat().bind(llm=ScriptedLLM(), replay=journal, replay_until=yields)
    await app.asend(None)
    elapsed = time.perf_counter() - start
    assert app.waiting is not None and not app.replaying
    return elapsed


async def replay_bench() -> dict[str, float]:
    journal, yields = await build(100)
    await replay(journal, yields)  # warm up
    in_ram = [await replay(journal, yields) for _ in range(50)]
    path = os.path.join(tempfile.mkdtemp(), "replay.db")
    key = ChannelKey("bench", "replay")
    async with SQLStore(f"sqlite+aiosqlite:///{path}") as store:
        record = ConversationRecord(new_id(), key, "bench:chat", {}, status="waiting")
        record.yields = yields
        await store.write(StepWrite(record=record, new_conversation=True, journal=journal))
        await store.flush()
        from_disk = []
        for _ in range(50):
            start = time.perf_counter()
            loaded = await store.load_conversation(key)
            assert loaded is not None
            app = chat().bind(llm=ScriptedLLM(), replay=loaded.journal, replay_until=loaded.yields)
            await app.asend(None)
            from_disk.append(time.perf_counter() - start)
    return {
        "journal_entries": len(journal),
        "replay_ms_median": round(statistics.median(in_ram) * 1000, 3),
        "load_and_replay_ms_median": round(statistics.median(from_disk) * 1000, 3),
    }


async def commit_bench(channels: int, seconds: float = 3.0) -> dict[str, float]:
    path = os.path.join(tempfile.mkdtemp(), "commits.db")
    async with SQLStore(f"sqlite+aiosqlite:///{path}") as store:
        transactions = 0
        original = store._commit

        async def counting(batch):  # type: ignore[no-untyped-def]
            nonlocal transactions
            transactions += 1
            return await original(batch)

        store._commit = counting  # type: ignore[method-assign]
        steps = 0
        deadline = time.perf_counter() + seconds

        async def channel(n: int) -> None:
            nonlocal steps
            record = ConversationRecord(new_id(), ChannelKey("bench", str(n)), "bench:chat", {})
            await store.write(StepWrite(record=record, new_conversation=True))
            seq = 0
            while time.perf_counter() < deadline:
                entry = JournalEntry("input", {"text": "hello"}, "0" * 32)
                await store.write(StepWrite(record=record, journal=[entry], journal_start=seq))
                await store.flush()
                seq += 1
                steps += 1

        start = time.perf_counter()
        await asyncio.gather(*(channel(n) for n in range(channels)))
        elapsed = time.perf_counter() - start
    return {
        "channels": channels,
        "steps_per_s": round(steps / elapsed),
        "transactions_per_s": round(transactions / elapsed),
        "steps_per_transaction": round(steps / max(1, transactions), 1),
    }


async def main() -> None:
    print(json.dumps({"replay_100_turns": await replay_bench()}))
    for channels in (1, 100, 1000):
        print(json.dumps({"group_commit_sqlite": await commit_bench(channels)}))


if __name__ == "__main__":
    asyncio.run(main())
