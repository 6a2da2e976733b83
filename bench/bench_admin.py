"""The operator's page on a large database: how long each page takes to serve.

Generates a database of N conversations (default 100,000) spread over 30 days, with
what a bot writes for them (transcript lines, inbox messages, replies, journal
entries, steps with timings, a few errors, a sample a minute), then requests every
page through the real app (Starlette and the Jinja2 templates, in-process through
httpx's ASGI transport: no network in the figure) and reports the median of several
requests per page.

    python bench/bench_admin.py                       # 100,000 conversations, SQLite
    python bench/bench_admin.py 20000 --url postgresql+asyncpg://...   # on PostgreSQL
    python bench/bench_admin.py --keep bench-admin.db  # keep (or reuse) the database

The data are synthetic, written straight into the tables (not through the runtime:
that would take hours at this size); their shapes are the runtime's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from turbobot.admin import create_app
from turbobot.sql import SQLStore
from turbobot.sql.schema import (
    conversations,
    errors,
    inbox,
    journal,
    messages,
    model_usage,
    outbox,
    samples,
    steps,
    usage,
)
from turbobot.store import utc_day

TOKEN = "bench-admin-token-0123456789"
DAYS = 30
USERS = 20_000
PLATFORMS = ("telegram", "discord", "console")
STATUSES = ("waiting",) * 5 + ("finished",) * 3 + ("failed", "diverged")
WORDS = [
    "the",
    "a",
    "weather",
    "poem",
    "tea",
    "train",
    "river",
    "money",
    "love",
    "work",
    "sleep",
    "cat",
    "city",
    "night",
]
CHUNK = 5_000


def _id(n: int) -> str:
    return f"{n:016x}bench000000"


def generate(count: int, now: float, seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    """Rows of every table for ``count`` conversations (three exchanges each)."""
    rng = random.Random(seed)
    rows: dict[str, list[dict[str, Any]]] = {
        name: []
        for name in ("conversations", "inbox", "messages", "outbox", "journal", "steps", "errors")
    }
    start = now - DAYS * 86400
    for n in range(count):
        platform = PLATFORMS[n % 3]
        user = f"user{rng.randrange(USERS)}"
        channel = json.dumps([platform, f"chat{n}", None, None])
        began = start + (n + rng.random()) * (DAYS * 86400 / count)
        conversation_id = _id(n)
        status = rng.choice(STATUSES)
        rows["conversations"].append(
            {
                "id": conversation_id,
                "channel": channel,
                "template_ref": "bots.assistant:assistant",
                "context": json.dumps({"platform": platform, "author_id": user}),
                "status": status,
                "yields": 7,
                "deadline": None,
                "broken": False,
                "started_at": began,
                "ended_at": None if status == "waiting" else began + 300,
                "platform": platform,
                "user_id": user,
            }
        )
        at = began
        for turn in range(3):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12)))
            message_id = f"{n}-{turn}"
            payload = {
                "key": {"platform": platform, "channel": f"chat{n}", "thread": None, "user": None},
                "text": text,
                "message_id": message_id,
                "author_id": user,
                "author_name": user,
                "timestamp": at,
                "attachments": [],
                "is_bot": False,
                "reply_to": None,
            }
            rows["inbox"].append(
                {
                    "channel": channel,
                    "message_id": message_id,
                    "payload": json.dumps(payload, separators=(",", ":")),
                    "received_at": at,
                    "consumed": True,
                }
            )
            reply_id = f"{conversation_id}r{turn}"
            answer = f"About {text}: " + " ".join(rng.choice(WORDS) for _ in range(30))
            llm = rng.lognormvariate(-0.5, 0.5)
            rows["messages"] += [
                {
                    "conversation_id": conversation_id,
                    "channel": channel,
                    "role": "user",
                    "text": "",
                    "at": at,
                    "prompt_tokens": None,
                    "completion_tokens": None,
                    "message_id": message_id,
                    "reply_id": None,
                    "streamed": None,
                },
                {
                    "conversation_id": conversation_id,
                    "channel": channel,
                    "role": "assistant",
                    "text": answer,
                    "at": at + llm,
                    "prompt_tokens": 120 + 60 * turn,
                    "completion_tokens": 40,
                    "message_id": None,
                    "reply_id": reply_id,
                    "streamed": turn % 2 == 1 or None,
                },
            ]
            rows["outbox"].append(
                {
                    "id": reply_id,
                    "channel": channel,
                    "text": answer,
                    "created_at": at + llm,
                    "sent": True,
                    "platform_id": str(n * 3 + turn),
                    "sent_at": at + llm + 0.05,
                }
            )
            rows["journal"] += [
                {
                    "conversation_id": conversation_id,
                    "seq": turn * 2 + k,
                    "kind": kind,
                    "value": value,
                    "chain": "0" * 16,
                    "message_id": message_id if kind == "input" else None,
                }
                for k, (kind, value) in enumerate(
                    (("input", "null"), ("generate", json.dumps({"content": answer})))
                )
            ]
            failed = rng.random() < 0.01
            rows["steps"].append(
                {
                    "conversation_id": conversation_id,
                    "channel": channel,
                    "platform": platform,
                    "user_id": user,
                    "trigger": "begin" if turn == 0 else "message",
                    "at": at,
                    "waited": 0.001,
                    "first_reply": llm + 0.002,
                    "llm": llm,
                    "duration": llm + 0.004,
                    "model": "gpt-4o-mini" if n % 4 else "gpt-4o",
                    "prompt_tokens": 120 + 60 * turn,
                    "completion_tokens": 40,
                    "generations": 1,
                    "replies": 1,
                    "error": "llm:LLMUnavailableError" if failed else None,
                }
            )
            if failed:
                rows["errors"].append(
                    {
                        "at": at,
                        "kind": "llm:LLMUnavailableError",
                        "channel": channel,
                        "conversation_id": conversation_id,
                        "reply_id": None,
                        "detail": "LLMUnavailableError: the LLM server is unavailable",
                    }
                )
            at += rng.uniform(20, 120)
    # the sums the runtime keeps as it writes steps
    per_user: dict[tuple[str, str, str], list[int]] = {}
    per_model: dict[tuple[str, str], list[float]] = {}
    for step in rows["steps"]:
        day = utc_day(step["at"])
        counts = per_user.setdefault((step["platform"], step["user_id"], day), [0, 0, 0])
        counts[0] += step["prompt_tokens"]
        counts[1] += step["completion_tokens"]
        counts[2] += 1
        sums = per_model.setdefault((day, step["model"]), [0, 0, 0, 0.0])
        sums[0] += step["prompt_tokens"]
        sums[1] += step["completion_tokens"]
        sums[2] += 1
        sums[3] += step["llm"]
    rows["usage"] = [
        {"platform": p, "user_id": u, "day": d, "prompt_tokens": c[0],
         "completion_tokens": c[1], "generations": c[2]}
        for (p, u, d), c in per_user.items()
    ]  # fmt: skip
    rows["model_usage"] = [
        {"day": d, "model": m, "prompt_tokens": c[0], "completion_tokens": c[1],
         "generations": c[2], "llm_seconds": c[3]}
        for (d, m), c in per_model.items()
    ]  # fmt: skip
    rows["samples"] = [
        {
            "at": start + minute * 60,
            "worker": "bench",
            "live": 500 + minute % 300,
            "queued": minute % 7,
            "evictions": minute * 3,
            "replays": minute,
        }
        for minute in range(DAYS * 24 * 60)
    ]
    return rows


TABLES = {
    "conversations": conversations,
    "inbox": inbox,
    "messages": messages,
    "outbox": outbox,
    "journal": journal,
    "steps": steps,
    "errors": errors,
    "samples": samples,
    "usage": usage,
    "model_usage": model_usage,
}


async def fill(url: str, count: int, now: float) -> float:
    store = SQLStore(url, upgrade=True)  # the schema, by the migrations
    await store.open()
    await store.aclose()
    engine = create_async_engine(url)
    began = time.perf_counter()
    try:
        async with engine.begin() as conn:
            if (await conn.execute(select(func.count()).select_from(conversations))).scalar():
                return 0.0  # reused
        rows = generate(count, now)
        for name, table in TABLES.items():
            table_rows = rows[name]
            for i in range(0, len(table_rows), CHUNK):
                async with engine.begin() as conn:
                    await conn.execute(insert(table), table_rows[i : i + CHUNK])
        if url.startswith("sqlite"):
            async with engine.begin() as conn:
                await conn.exec_driver_sql("ANALYZE")
        else:
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.exec_driver_sql("VACUUM ANALYZE")
    finally:
        await engine.dispose()
    return time.perf_counter() - began


async def measure(url: str, now: float, rounds: int) -> list[tuple[str, float, float, int]]:
    app = create_app(url, TOKEN, clock=lambda: now)
    results = []
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin", headers=headers
    ) as client:
        # a cursor 100 pages deep, and a conversation to open
        first = await client.get("/conversations")
        assert first.status_code == 200, first.text[:500]
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            deep = (
                await conn.execute(
                    select(conversations.c.started_at, conversations.c.id)
                    .order_by(conversations.c.started_at.desc(), conversations.c.id.desc())
                    .offset(100 * 50 - 1)
                    .limit(1)
                )
            ).one()
            some = (await conn.execute(select(conversations.c.id).limit(1).offset(777))).scalar()
        await engine.dispose()
        pages = [
            ("conversations, newest", "/conversations"),
            ("conversations, page 101", f"/conversations?before={deep[0]!r}:{deep[1]}"),
            ("filter: platform", "/conversations?platform=discord"),
            ("filter: state failed", "/conversations?state=failed"),
            ("filter: state timed out", "/conversations?state=timed_out"),
            ("filter: user", "/conversations?user=user123"),
            ("filter: text (common word)", "/conversations?q=weather+poem"),
            ("filter: text (absent)", "/conversations?q=zebra"),
            ("one conversation", f"/conversations/{some}"),
            ("usage, 14 days", "/usage?days=14"),
            ("usage, 30 days", "/usage?days=30"),
            ("health, 6 hours", "/health?hours=6"),
            ("health, 24 hours", "/health?hours=24"),
        ]
        for name, path in pages:
            times = []
            size = 0
            for _ in range(rounds):
                began = time.perf_counter()
                answer = await client.get(path)
                times.append(time.perf_counter() - began)
                assert answer.status_code == 200, (path, answer.status_code)
                size = len(answer.content)
            results.append((name, statistics.median(times), max(times), size))
    await app.state.engine.dispose()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("conversations", type=int, nargs="?", default=100_000)
    parser.add_argument("--url", help="a database URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--keep", help="SQLite file to keep (reused if it has data)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.url:
        url = args.url
    else:
        path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "admin-bench.db"
        url = f"sqlite+aiosqlite:///{path}"
    now = time.time()
    took = await fill(url, args.conversations, now)
    print(f"database: {url.split('://')[0]}, {args.conversations:,} conversations", flush=True)
    if took:
        print(f"filled in {took:.0f} s", flush=True)
    print("| page | median ms | max ms | KB |\n|---|---|---|---|")
    for name, median, worst, size in await measure(url, now, args.rounds):
        print(f"| {name} | {median * 1000:.1f} | {worst * 1000:.1f} | {size / 1024:.0f} |")


if __name__ == "__main__":
    asyncio.run(main())
