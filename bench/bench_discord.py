"""The Discord adapter against the fake Discord server: messages/s and streaming edits.

usage: python bench/bench_discord.py [USERS]

1. Throughput: ``turbobot run bench/telegram_twostep_bot.py --platform discord`` runs
   in a subprocess on a fresh SQLite file (WAL, synchronous=FULL), connected to the
   fake REST API and gateway in this process. USERS DM channels each send "hi" (the
   bot asks their name) and then a name (the bot says hello): every message goes
   through the gateway, discord.py's parsing, the durable inbox, a conversation step
   and a REST POST. Reported: messages/s from the first message to the last reply
   received, and the CPU of both sides (per message).
2. Streaming: a ~2,400-character reply streamed over ~10 s into a DM with the default
   pacing (one edit per 1.2 s per channel), then the same while the server answers 429
   to three edits. Reported: edits per second and whether the final message equals the
   full reply.

The fake servers come from fakes (the same ones the test suite uses).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_telegram import cpu_of, own_cpu  # noqa: E402

from fakes.discord_server import FakeDiscord  # noqa: E402
from fakes.openai_server import FakeOpenAI, Reply  # noqa: E402


async def throughput(users: int) -> dict[str, Any]:
    base = 10_000
    async with FakeDiscord() as fake:
        db = Path(tempfile.mkdtemp(prefix="bench-dc-")) / "bot.db"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TURBOBOT_", "OPENAI_"))},
            "DISCORD_BOT_TOKEN": fake.token,
            "DISCORD_API_BASE_URL": fake.api_url,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "OPENAI_API_KEY": "unused",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "TURBOBOT_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "turbobot",
            "run",
            "bench/telegram_twostep_bot.py",
            "--platform",
            "discord",
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await fake.wait_for(lambda: bool(fake.commands), timeout=60)
        channels = [fake.dm_channel(base + i) for i in range(users + 1)]
        warm = channels.pop()
        await fake.user_message(warm, "hi", user_id=base + users)
        await fake.user_message(warm, "Warm", user_id=base + users)
        await fake.wait_for(lambda: len(fake.sent) >= 2, timeout=30)
        sent_before = len(fake.sent)
        bot_cpu, fake_cpu = cpu_of(proc.pid), own_cpu()
        started = time.perf_counter()
        for i, channel in enumerate(channels):
            await fake.user_message(channel, "hi", user_id=base + i)
        await fake.wait_for(lambda: len(fake.sent) >= sent_before + users, timeout=600)
        for i, channel in enumerate(channels):
            await fake.user_message(channel, f"N{i}", user_id=base + i)
        await fake.wait_for(lambda: len(fake.sent) >= sent_before + 2 * users, timeout=600)
        elapsed = time.perf_counter() - started
        bot_cpu, fake_cpu = cpu_of(proc.pid) - bot_cpu, own_cpu() - fake_cpu
        ok = all(
            [m["content"] for m in fake.messages(channel)] == ["What's your name?", f"Hello N{i}"]
            for i, channel in enumerate(channels)
        )
        proc.terminate()
        await proc.wait()
    return {
        "bench": "discord-throughput",
        "users": users,
        "messages": 2 * users,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(2 * users / elapsed, 1),
        "bot_cpu_ms_per_message": round(bot_cpu * 1000 / (2 * users), 2),
        "fake_server_cpu_s": round(fake_cpu, 2),
        "replies_ok": ok,
        "typing_calls": len(fake.typing),
    }


async def streaming() -> list[dict[str, Any]]:
    from turbobot import Generate, GetUserInput, User, turbo
    from turbobot.adapters.discord import DiscordAdapter, DiscordSettings
    from turbobot.llm.openai import OpenAILLM
    from turbobot.runtime import Runtime
    from turbobot.store import InMemoryStore

    @turbo()
    async def streamer() -> Any:
        while True:
            message = yield GetUserInput()
            yield User(content=message)
            yield Generate(stream=True)

    words = " ".join(f"w{i}" for i in range(600))  # 5-char chunks every 20 ms: ~10 s
    results = []
    for label, faults in (("DM edits", 0), ("DM edits, three answered 429", 3)):
        openai_server = await FakeOpenAI().start()
        async with FakeDiscord() as fake:
            openai_server.script(Reply(content=words, chunk_delay=0.02))
            dm = fake.dm_channel(7)
            if faults:
                fake.fail("PATCH", rf"/channels/{dm}/messages/\d+", retry_after=1.0, times=faults)
            llm = OpenAILLM(api_key="k", base_url=openai_server.base_url)
            settings = DiscordSettings(
                token=fake.token, api_base_url=fake.api_url, gateway_url=fake.gateway_url
            )
            async with (
                DiscordAdapter(settings) as adapter,
                Runtime(streamer, llm=llm, sender=adapter, store=InMemoryStore()) as runtime,
            ):
                task = asyncio.create_task(adapter.run(runtime, handle_signals=False))
                await adapter.wait_until_ready()
                started = time.monotonic()
                await fake.user_message(dm, "go", user_id=7)
                await fake.wait_for(
                    lambda: " ".join(m["content"] for m in fake.messages(dm)) == words,  # noqa: B023
                    timeout=60,
                )
                elapsed = time.monotonic() - started
                adapter.stop()
                await task
            await llm.aclose()
            patches = [s for s in fake.statuses if s[0] == "PATCH"]
            accepted = [s for s in patches if s[2] == 200]
            gaps = [b.at - a.at for a, b in zip(fake.edits, fake.edits[1:], strict=False)]
            results.append(
                {
                    "bench": "discord-streaming",
                    "case": label,
                    "seconds": round(elapsed, 2),
                    "messages": len(fake.messages(dm)),
                    "edits_accepted": len(accepted),
                    "edits_per_s": round(len(accepted) / elapsed, 2),
                    "shortest_gap_s": round(min(gaps), 3) if gaps else None,
                    "rejected_429": sum(1 for s in patches if s[2] == 429),
                    "final_complete": " ".join(m["content"] for m in fake.messages(dm)) == words,
                }
            )
        await openai_server.stop()
    return results


async def main() -> None:
    users = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    print(json.dumps(await throughput(users)))
    for row in await streaming():
        print(json.dumps(row))


if __name__ == "__main__":
    asyncio.run(main())
