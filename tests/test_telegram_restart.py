"""``turbobot run --platform telegram`` in a subprocess: kill -9, restart, lose nothing.

The bot polls the fake Bot API server and asks the fake OpenAI server, both run by
the test; the database is a real SQLite file that survives the kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import AsyncIterator

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from fakes.telegram_server import FakeTelegram
from tests.test_console import clean_env, communicate, spawn_turbobot

pytestmark = pytest.mark.slow

CHAT = 5151
WELCOME = "Welcome, traveller. What is your zodiac sign?"
LEO = "Ah, Leo. What do you want to know?"


class CliBot:
    """The CLI running bots.horoscope on a platform, in a subprocess (DEBUG logs on)."""

    def __init__(self, env: dict[str, str], *args: str, platform: str = "telegram") -> None:
        self.env = env
        self.args = ("--platform", platform, *args)
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""

    async def start(self) -> CliBot:
        self.proc = await spawn_turbobot(
            self.env,
            "--log-level",
            "DEBUG",
            "run",
            "bots.horoscope",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
        )
        return self

    async def kill(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL
        self.stderr += await self.proc.stderr.read()

    async def terminate(self) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return (await self.finish())[0]

    async def finish(self) -> tuple[int, str]:
        """Wait for the exit; the exit code and what it wrote to stderr."""
        assert self.proc is not None
        _, err = await asyncio.wait_for(self.proc.communicate(), 30)
        self.stderr += err
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


async def texts(fake: FakeTelegram, count: int) -> list[str]:
    await fake.wait_until(lambda: len(fake.sent(CHAT)) >= count, timeout=30)
    return fake.texts(CHAT, plain=True)


async def wait_for_outbox_empty(env: dict[str, str]) -> None:
    path = env["TURBOBOT_DATABASE_URL"].removeprefix("sqlite+aiosqlite:///")
    for _ in range(300):
        with contextlib.closing(sqlite3.connect(path)) as db:
            (unsent,) = db.execute("SELECT count(*) FROM outbox WHERE NOT sent").fetchone()
        if unsent == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the bot never marked its reply as sent")


async def test_kill_9_mid_generation_and_while_waiting_then_resume(
    telegram: FakeTelegram, openai_server: FakeOpenAI
) -> None:
    env = clean_env(
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_BASE_URL=telegram.base_url,
        OPENAI_API_KEY="sk-test-key",
        OPENAI_BASE_URL=openai_server.base_url,
    )
    bot = await CliBot(env).start()
    telegram.message(CHAT, "hi")
    assert await texts(telegram, 1) == [WELCOME]
    telegram.message(CHAT, "I am a leo")
    assert await texts(telegram, 2) == [WELCOME, LEO]

    # 1. killed while the model is generating: the question stays in the inbox
    openai_server.script(Reply("The stars say yes.", delay=30), "The stars say yes.")
    telegram.message(CHAT, "money?")
    await telegram.wait_until(lambda: len(openai_server.requests) == 1, timeout=30)
    await bot.kill()

    bot = await CliBot(env).start()
    assert await texts(telegram, 3) == [WELCOME, LEO, "The stars say yes."]

    # 2. killed while waiting (once the reply is marked sent: a kill between sending and
    # marking repeats that reply after the restart, the documented at-least-once window)
    await wait_for_outbox_empty(env)
    await bot.kill()
    telegram.message(CHAT, "thanks")
    bot = await CliBot(env).start()
    assert (await texts(telegram, 4))[3] == "echo: thanks"

    # 3. SIGTERM stops it cleanly
    assert await bot.terminate() == 0
    assert telegram.texts(CHAT, plain=True) == [WELCOME, LEO, "The stars say yes.", "echo: thanks"]
    assert len(openai_server.requests) == 3  # the interrupted generation, its retry, thanks
    assert [m["content"] for m in openai_server.requests[2]["messages"] if m["role"] == "user"][
        -1
    ] == "thanks"
    assert b"getUpdates" in bot.stderr  # DEBUG logs were on ...
    assert telegram.token.encode() not in bot.stderr  # ... and never showed the token
    assert b"sk-test-key" not in bot.stderr


async def test_cli_configuration_errors(telegram: FakeTelegram) -> None:
    async def run(env: dict[str, str], *args: str) -> tuple[int, str]:
        proc = await spawn_turbobot(
            env,
            "run",
            "bots.horoscope",
            "--platform",
            "telegram",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
        )
        _, err = await communicate(proc, timeout=30)
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    code, err = await run(clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL="http://127.0.0.1:9/v1"))
    assert code == 2 and "TELEGRAM_BOT_TOKEN is not set" in err

    wrong = clean_env(
        TELEGRAM_BOT_TOKEN="42:wrong-secret-token",
        TELEGRAM_API_BASE_URL=telegram.base_url,
        OPENAI_API_KEY="k",
        OPENAI_BASE_URL="http://127.0.0.1:9/v1",
    )
    code, err = await run(wrong)
    assert code == 2 and "Telegram refused the bot token" in err
    assert "wrong-secret-token" not in err

    code, err = await run(
        {**wrong, "TELEGRAM_BOT_TOKEN": telegram.token}, "--webhook-url", "https://e.org/hook"
    )
    assert code == 2 and "needs a secret token" in err
