"""The Telegram adapter against the fake Bot API server: updates/s and streaming edits.

usage: python bench/bench_telegram.py [CHATS]

1. Throughput: ``turbobot run bench/telegram_twostep_bot.py --platform telegram`` runs
   in a subprocess on a fresh SQLite file (WAL, synchronous=FULL), polling the fake
   server in this process. CHATS private chats each send "hi" (the bot asks their
   name) and then a name (the bot says hello): every update goes through getUpdates,
   the durable inbox, a conversation step and a sendMessage. Reported: updates/s from
   the first update offered to the last reply received, and the CPU of both sides.
2. Streaming: a reply streamed for ~6 s (50 chunks/s) into a group chat (edits) and
   into a private chat (drafts), with the default pacing (1 update/s per chat), then
   the same group stream while the server answers 429 (retry_after=1) to any edit
   sooner than 2 s after the last. Reported: updates per second and whether the final
   message equals the full reply.

Throughput runs twice: with the default global limit of 30 messages/s (what
Telegram allows), and with the limit raised to 10,000/s (TELEGRAM_RATE) to show what
the adapter itself sustains.

The fake servers come from fakes (the same ones the test suite uses).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fakes.openai_server import FakeOpenAI, Reply  # noqa: E402
from fakes.telegram_server import FakeTelegram  # noqa: E402


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def throughput(chats: int, rate: float) -> dict[str, Any]:
    base = 10_000
    async with FakeTelegram() as fake:
        db = Path(tempfile.mkdtemp(prefix="bench-tg-")) / "bot.db"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TURBOBOT_", "OPENAI_"))},
            "TELEGRAM_BOT_TOKEN": fake.token,
            "TELEGRAM_API_BASE_URL": fake.base_url,
            "OPENAI_API_KEY": "unused",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "TURBOBOT_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
            "TELEGRAM_RATE": str(rate),
        }
        profile = os.environ.get("BENCH_PROFILE")  # a cProfile output file for the bot
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *(["-m", "cProfile", "-o", profile] if profile else []),
            "-m",
            "turbobot",
            "run",
            "bench/telegram_twostep_bot.py",
            "--platform",
            "telegram",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await fake.wait_until(lambda: bool(fake.calls_of("getUpdates")), timeout=30)
        # warm-up: one conversation
        fake.message(base - 1, "hi")
        fake.message(base - 1, "Warm")
        await fake.wait_until(lambda: len(fake.calls_of("sendMessage")) >= 2, timeout=30)
        sent_before = len(fake.calls_of("sendMessage"))
        bot_cpu, fake_cpu = cpu_of(proc.pid), own_cpu()
        started = time.perf_counter()
        for i in range(chats):
            fake.message(base + i, "hi")
        await fake.wait_until(
            lambda: len(fake.calls_of("sendMessage")) >= sent_before + chats, timeout=600
        )
        for i in range(chats):
            fake.message(base + i, f"N{i}")
        await fake.wait_until(
            lambda: len(fake.calls_of("sendMessage")) >= sent_before + 2 * chats, timeout=600
        )
        elapsed = time.perf_counter() - started
        bot_cpu, fake_cpu = cpu_of(proc.pid) - bot_cpu, own_cpu() - fake_cpu
        ok = all(
            fake.texts(base + i, plain=True) == ["What's your name?", f"Hello N{i}"]
            for i in range(chats)
        )
        typing_calls = len(fake.calls_of("sendChatAction"))
        polls = len(fake.calls_of("getUpdates"))
        proc.terminate()
        await proc.wait()
    return {
        "bench": "telegram-throughput",
        "chats": chats,
        "rate_limit": rate,
        "updates": 2 * chats,
        "seconds": round(elapsed, 3),
        "updates_per_s": round(2 * chats / elapsed, 1),
        "bot_cpu_s": round(bot_cpu, 2),
        "fake_server_cpu_s": round(fake_cpu, 2),
        "replies_ok": ok,
        "typing_calls": typing_calls,
        "getupdates_calls": polls,
    }


async def streaming() -> list[dict[str, Any]]:
    from turbobot import Generate, GetUserInput, User, turbo
    from turbobot.adapters.telegram import TelegramAdapter, TelegramSettings
    from turbobot.llm.openai import OpenAILLM
    from turbobot.runtime import Runtime, RuntimeSettings
    from turbobot.store import InMemoryStore

    @turbo()
    async def streamer() -> Any:
        while True:
            message = yield GetUserInput()
            yield User(content=message)
            yield Generate(stream=True)

    words = " ".join(f"w{i}" for i in range(500))  # 5-char chunks, 50/s: ~6 s
    results = []
    for label, chat, pace in (
        ("group edits", -100500, None),
        ("private drafts", 500, None),
        ("group edits, 429 if sooner than 2 s", -100500, 2.0),
    ):
        openai_server = await FakeOpenAI().start()
        async with FakeTelegram() as fake:
            openai_server.script(Reply(content=words, chunk_delay=0.02))
            if pace:
                fake.limit_edits(per_seconds=pace, retry_after=1)
            llm = OpenAILLM(api_key="k", base_url=openai_server.base_url)
            settings = TelegramSettings(token=fake.token, base_url=fake.base_url, poll_timeout=1)
            async with TelegramAdapter(settings) as adapter:
                runtime_settings = RuntimeSettings(bot_username=adapter.username)
                async with Runtime(
                    streamer,
                    llm=llm,
                    sender=adapter,
                    store=InMemoryStore(),
                    settings=runtime_settings,
                ) as runtime:
                    task = asyncio.create_task(adapter.run(runtime, handle_signals=False))
                    started = time.monotonic()
                    fake.message(chat, "@turbo_test_bot go" if chat < 0 else "go", user_id=7)
                    await fake.wait_until(
                        lambda: fake.texts(chat, plain=True) == [words],  # noqa: B023
                        timeout=60,
                    )
                    elapsed = time.monotonic() - started
                    adapter.stop()
                    await task
            await llm.aclose()
            method = "sendMessageDraft" if chat > 0 else "editMessageText"
            calls = fake.calls_of(method)
            accepted = [c for c in calls if c.status == 200]
            results.append(
                {
                    "bench": "telegram-streaming",
                    "case": label,
                    "seconds": round(elapsed, 2),
                    "updates_sent": len(calls),
                    "updates_accepted": len(accepted),
                    "accepted_per_s": round(len(accepted) / elapsed, 2),
                    "rejected_429": sum(1 for c in calls if c.status == 429),
                    "final_complete": fake.texts(chat, plain=True) == [words],
                }
            )
        await openai_server.stop()
    return results


async def main() -> None:
    chats = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    # Telegram's own limit (30 messages/s) bounds replies; 10,000/s shows the adapter.
    for rate in [float(r) for r in os.environ.get("BENCH_RATES", "30,10000").split(",")]:
        print(json.dumps(await throughput(chats, rate)))
    for row in await streaming():
        print(json.dumps(row))


if __name__ == "__main__":
    asyncio.run(main())
