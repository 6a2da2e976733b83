"""The crash suite on Discord: ``turbobot run --platform discord`` killed with SIGKILL at
seeded random points while many DM channels hold conversations, restarted each time.

The same template and checks as tests/test_crash.py (Telegram), with what Discord
changes: its gateway does not deliver again a message dispatched to a process that
died before committing it (nor what is sent while no process is connected). So the
users here write only while a bot is connected, and after each restart a user whose
last message the dead process never committed sends it again, as a person who got no
answer would (counted: "sent again"). Everything the bot committed is then handled
once; each transcript equals the uninterrupted one. A streamed reply cut by a kill
leaves its preview on screen (the process that could finish or delete it is gone;
the restarted bot sends the reply whole): counted as "previews left".

Size: ``CRASH_CHATS`` chats (Discord default 16), ``CRASH_KILLS`` kills, ``CRASH_SEED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakes.discord_server import FakeDiscord
from fakes.openai_server import FakeOpenAI
from tests.test_console import clean_env
from tests.test_crash import (
    API_KEY,
    KILLS,
    SEED,
    BotProcess,
    assert_no_secrets,
    assert_redone_only_when_interrupted,
    bot_lines,
    model_server,
    transcript,
    upgrade_schema,
    user_messages,
)
from turbobot import ChannelKey
from turbobot.sql import SQLStore

pytestmark = pytest.mark.slow

CHATS = int(os.environ.get("CRASH_CHATS", "16"))
FIRST_USER = 9000


@dataclass
class DiscordRun(BotProcess):
    """The fakes, the bot process, the kills."""

    discord: FakeDiscord
    llm: FakeOpenAI
    env: dict[str, str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    kill_times: list[float] = field(default_factory=list)
    starts: int = 0
    log_level: str = "WARNING"

    def registrations(self) -> int:
        """Starts that were ready (each registers its commands on ``on_ready``)."""
        return len(self.discord.calls_to("PUT", r"/applications/\d+/commands"))

    async def start(self) -> None:
        ready = self.registrations()
        await self.spawn("discord")
        await self.discord.wait_for(lambda: self.registrations() > ready, timeout=60)

    def events(self) -> int:
        return len(self.discord.calls) + len(self.llm.requests)

    def shown(self, user: int) -> list[str]:
        return [m["content"] for m in self.discord.messages(self.discord.dm_channel(user))]

    def progress(self, user: int) -> int:
        """How many of the chat's expected bot lines are on screen, in order."""
        expected, seen = bot_lines(user), 0
        for text in self.shown(user):
            if seen < len(expected) and text == expected[seen]:
                seen += 1
        return seen


async def unread(store: SQLStore, run: DiscordRun, user: int, sent: list[str]) -> list[str]:
    """What ``user`` sent that the bot never committed (its process died first)."""
    key = ChannelKey("discord", str(run.discord.dm_channel(user)))
    read = [line.text for line in await store.transcript(key) if line.role == "user"]
    read += [item.message.text for item in await store.inbox(key)]
    return [text for text in sent if text not in read]


async def drive(
    run: DiscordRun, store: SQLStore, users: list[int], kills: int, rng: random.Random
) -> int:
    """Like the Telegram suite's drive; returns how many messages were sent again."""
    total = sum(len(user_messages(u)) for u in users)
    points = sorted(rng.sample(range(1, int(total * 0.9)), kills))
    delays = [rng.randrange(0, 25) for _ in points]
    sent: dict[int, list[str]] = {u: [] for u in users}
    count = resent = 0
    armed: int | None = None
    armed_at = 0.0
    deadline = time.monotonic() + 180 + 10 * kills + CHATS
    while True:
        for user in users if armed is None else ():
            said = user_messages(user)
            while len(sent[user]) < len(said) and len(sent[user]) <= run.progress(user):
                text = said[len(sent[user])]
                channel = run.discord.dm_channel(user)
                await run.discord.user_message(channel, text, user_id=user)
                sent[user].append(text)
                count += 1
                if points and count >= points[0]:
                    points.pop(0)
                    armed, armed_at = run.events() + delays.pop(0), time.monotonic()
                    break
            if armed is not None:
                break
        if armed is not None and (run.events() >= armed or time.monotonic() - armed_at > 2):
            armed = None
            await run.kill()
            await run.start()
            for user in users:  # the gateway will not deliver these again: resend
                for text in await unread(store, run, user, sent[user]):
                    channel = run.discord.dm_channel(user)
                    await run.discord.user_message(channel, text, user_id=user)
                    resent += 1
        if armed is None and all(run.progress(u) == len(bot_lines(u)) for u in users):
            return resent
        if time.monotonic() > deadline:
            stuck = {u: run.progress(u) for u in users if run.progress(u) < len(bot_lines(u))}
            raise AssertionError(f"chats stuck (user: lines shown): {stuck}")
        with contextlib.suppress(TimeoutError):
            await run.discord.wait_for(lambda: False, timeout=0.2)


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeDiscord, FakeOpenAI]]:
    async with model_server() as llm, FakeDiscord() as discord:
        yield discord, llm


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_kills_on_discord_lose_and_repeat_nothing_committed(
    store_url: str, fakes: tuple[FakeDiscord, FakeOpenAI], tmp_path: Path
) -> None:
    discord, llm = fakes
    env = clean_env(
        DISCORD_BOT_TOKEN=discord.token,
        DISCORD_API_BASE_URL=discord.api_url,
        DISCORD_GATEWAY_URL=discord.gateway_url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=llm.base_url,
        TURBOBOT_DATABASE_URL=store_url,
    )
    await upgrade_schema(env)
    run = DiscordRun(discord, llm, env, tmp_path / "bot.log")
    users = [FIRST_USER + i for i in range(CHATS)]
    store = SQLStore(store_url)
    await store.open()
    try:
        await run.start()
        resent = await drive(run, store, users, KILLS, random.Random(SEED))
        assert await run.stop() == 0, run.log.read_text()[-3000:]
        assert len(run.kill_times) == KILLS
        for user in users:
            key = ChannelKey("discord", str(discord.dm_channel(user)))
            got = [(line.role, line.text) for line in await store.transcript(key)]
            # each input once (a message sent again was one the bot never had), in order
            assert got == transcript(user), user
            assert await store.inbox(key) == [], f"user {user}: inputs left unconsumed"
    finally:
        await store.aclose()

    duplicates = previews = 0
    kinds: Counter[str] = Counter()
    for user in users:
        expected = bot_lines(user)
        assert run.progress(user) == len(expected), user
        extra = Counter(run.shown(user)) - Counter(expected)
        for text, n in extra.items():
            if text in expected:
                duplicates += n
                kinds[text.split(":")[0].split(",")[0]] += n
            else:  # a streamed reply's preview, left by a killed process
                assert any(line.startswith(text.rstrip(" …")) for line in expected), (user, text)
                previews += n

    def shown_at(user: int, text: str, after: float) -> float | None:
        """When ``text`` was first on screen in the user's DM: posted whole, or the edit
        that completed a streamed preview."""
        channel = discord.dm_channel(user)
        posted = [
            call.at
            for call in discord.calls_to("POST", f"/channels/{channel}/messages")
            if call.status == 200 and (call.body or {}).get("content") == text
        ]
        mine = {int(m["id"]) for m in discord.messages(channel)}
        edited = [edit.at for edit in discord.edits if edit[0] in mine and edit[1] == text]
        return min((t for t in posted + edited if t >= after), default=None)

    redone = assert_redone_only_when_interrupted(llm, run.kill_times, shown_at, CHATS)
    print(
        f"\ncrash run on Discord ({store_url.split(':')[0]}): {CHATS} chats, {KILLS} kills, "
        f"seed {SEED}: {sum(len(user_messages(u)) for u in users)} inputs, 0 lost, 0 "
        f"processed twice; {resent} sent again (never committed by a killed process); "
        f"{redone} generations redone after a kill; {duplicates} replies shown "
        f"twice ({dict(kinds)}); {previews} previews left"
    )
    await assert_no_secrets(store_url, run.log, discord.token, API_KEY)
