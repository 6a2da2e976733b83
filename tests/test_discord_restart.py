"""``turbobot run --platform discord`` in a subprocess: kill -9, restart, lose nothing;
configuration mistakes are one clear line and exit 2.

The bot connects to the fake Discord server and asks the fake OpenAI server, both run
by the test; the database is a real SQLite file that survives the kills.
"""

from __future__ import annotations

import asyncio

import pytest

from fakes.discord_server import FakeDiscord
from fakes.openai_server import FakeOpenAI, Reply
from tests.test_console import clean_env
from tests.test_telegram_restart import CliBot, wait_for_outbox_empty

pytestmark = pytest.mark.slow

ALICE = 601
WELCOME = "Welcome, traveller. What is your zodiac sign?"
LEO = "Ah, Leo. What do you want to know?"


def DiscordBot(env: dict[str, str], *args: str) -> CliBot:
    return CliBot(env, *args, platform="discord")


def bot_env(fake: FakeDiscord, openai_server: FakeOpenAI, **extra: str) -> dict[str, str]:
    return clean_env(
        DISCORD_BOT_TOKEN=fake.token,
        DISCORD_API_BASE_URL=fake.api_url,
        DISCORD_GATEWAY_URL=fake.gateway_url,
        OPENAI_API_KEY="sk-test-key",
        OPENAI_BASE_URL=openai_server.base_url,
        **extra,
    )


async def texts(fake: FakeDiscord, channel: int, count: int) -> list[str]:
    await fake.wait_for(lambda: len(fake.messages(channel)) >= count, timeout=30)
    return [m["content"] for m in fake.messages(channel)]


def registrations(fake: FakeDiscord) -> int:
    """How many times a bot registered its commands (on discord.py's ``on_ready``, once
    the servers' data came or ``ready_timeout`` passed): how many starts were ready."""
    return len(fake.calls_to("PUT", r"/applications/\d+/commands"))


async def connected(fake: FakeDiscord, count: int) -> None:
    """Wait until ``count`` starts were ready."""
    await fake.wait_for(lambda: registrations(fake) >= count, timeout=30)


async def test_kill_9_mid_generation_and_while_waiting_then_resume(
    discord_fake: FakeDiscord, openai_server: FakeOpenAI
) -> None:
    env = bot_env(discord_fake, openai_server)
    dm = discord_fake.dm_channel(ALICE)
    bot = await DiscordBot(env).start()
    await connected(discord_fake, 1)
    await discord_fake.user_message(dm, "hi", user_id=ALICE)
    assert await texts(discord_fake, dm, 1) == [WELCOME]
    await discord_fake.user_message(dm, "I am a leo", user_id=ALICE)
    assert await texts(discord_fake, dm, 2) == [WELCOME, LEO]

    # 1. killed while the model is generating: the question is committed, and the
    # restarted bot answers it without being asked again
    openai_server.script(Reply("The stars say yes.", delay=30), "The stars say yes.")
    await discord_fake.user_message(dm, "money?", user_id=ALICE)
    await openai_server_waits(openai_server, 1)
    await bot.kill()
    bot = await DiscordBot(env).start()
    assert await texts(discord_fake, dm, 3) == [WELCOME, LEO, "The stars say yes."]

    # 2. killed while waiting for the user; the next message goes to the restarted bot
    await wait_for_outbox_empty(env)
    await bot.kill()
    ready = registrations(discord_fake)
    bot = await DiscordBot(env).start()
    await connected(discord_fake, ready + 1)
    await discord_fake.user_message(dm, "thanks", user_id=ALICE)
    assert (await texts(discord_fake, dm, 4))[3] == "echo: thanks"

    # 3. SIGTERM stops it cleanly
    assert await bot.terminate() == 0
    assert [m["content"] for m in discord_fake.messages(dm)] == [
        WELCOME,
        LEO,
        "The stars say yes.",
        "echo: thanks",
    ]
    assert len(openai_server.requests) == 3  # the interrupted generation, its retry, thanks
    assert b"is running; Ctrl-C stops it" in bot.stderr
    assert b"WebSocket Event" in bot.stderr  # DEBUG logs were on ...
    assert discord_fake.token.encode() not in bot.stderr  # ... and never showed the token
    assert b"sk-test-key" not in bot.stderr


async def openai_server_waits(server: FakeOpenAI, count: int) -> None:
    for _ in range(600):
        if len(server.requests) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the model was never asked")


async def test_cli_configuration_errors(
    discord_fake: FakeDiscord, openai_server: FakeOpenAI
) -> None:
    async def run(env: dict[str, str], *args: str) -> tuple[int, str]:
        bot = await DiscordBot(env, *args).start()
        return await bot.finish()

    env = bot_env(discord_fake, openai_server)
    code, err = await run({**env, "DISCORD_BOT_TOKEN": ""})
    assert code == 2 and "DISCORD_BOT_TOKEN is not set" in err
    assert "Traceback" not in err
    code, err = await run({**env, "DISCORD_BOT_TOKEN": "not-the-token"})
    assert code == 2 and "Discord refused the bot token" in err
    assert "Traceback" not in err and "not-the-token" not in err
    code, err = await run({**env, "DISCORD_API_BASE_URL": "http://127.0.0.1:9/api/v10"})
    assert code == 2 and "cannot reach the Discord API" in err
    code, err = await run(env, "--shard-ids", "0")
    assert code == 2 and "need the total number of shards too (--shard-count" in err
    async with FakeDiscord(allow_message_content=False) as strict:
        code, err = await run(bot_env(strict, openai_server))
    assert code == 2 and "Message Content Intent" in err
    assert "Traceback" not in err
    assert "is running" not in err  # said only once the gateway is connected
