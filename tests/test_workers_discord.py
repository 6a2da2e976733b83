"""Discord split over two ``turbobot run`` processes (as on two machines) that share one
PostgreSQL database: the scale-out suite on Discord.

Each process runs one of the bot's two shards (``DISCORD_SHARD_COUNT=2``,
``DISCORD_SHARD_IDS=0`` or ``1``) against the fake Discord server, so each receives
only its shard's events: the guilds dealt to it (guild number ``n`` lands on shard
``n % 2``) and, for shard 0, the DMs. Either process may then process a channel: the
one that received a message commits it to the inbox, and whichever holds the
channel's lease answers it (the other learns of it by NOTIFY). Every conversation
runs ``tests.workers_bot:tally``, whose replies number the messages, so that a
message lost, answered twice or out of order shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fakes.discord_server import FakeDiscord, shard_for
from tests.test_console import clean_env
from tests.test_crash import API_KEY, model_server, upgrade_schema
from tests.test_workers import sql
from tests.test_workers_processes import turbobot_run
from turbobot import ChannelKey
from turbobot.sql import SQLStore
from turbobot.sql.store import channel_column, parse_channel_column

from .conftest import _create_database

pytestmark = pytest.mark.slow

SHARDS = 2
GUILDS = 6  # three per shard
CHANNELS = ("general", "random")  # a member of its own in each
DMS = 6  # all on shard 0
ROUNDS = 5
FIRST_USER = 9100


@dataclass
class Conversation:
    """One user talking to the bot in one channel (a guild's, or their DM)."""

    channel: int
    user: int
    guild: int | None  # None: a DM
    paced: bool  # each message once the reply to the previous one is on screen
    leased_to: str | None = None  # a worker that held the channel before this run

    @property
    def shard(self) -> int:
        return shard_for(self.guild, SHARDS)

    @property
    def receiver(self) -> str:
        """The process the gateway gives the conversation's messages to."""
        return f"d{self.shard}"

    @property
    def key(self) -> ChannelKey:
        """The conversation's key (in a guild, each member has their own)."""
        user = None if self.guild is None else str(self.user)
        return ChannelKey("discord", str(self.channel), None, user)


def expected(rounds: int = ROUNDS) -> list[str]:
    return [f"{n}:m{n}" for n in range(1, rounds + 1)]


def worker(
    env: dict[str, str], name: str, shard: int, log: Path
) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """``turbobot run`` for one shard, stopped (SIGTERM) at the end if still running."""
    return turbobot_run(
        {**env, "TURBOBOT_WORKER_NAME": name, "DISCORD_SHARD_IDS": str(shard)},
        log,
        "tests.workers_bot:tally",
        "--platform",
        "discord",
    )


async def talk(discord: FakeDiscord, conv: Conversation) -> None:
    """The user sends m1..m{ROUNDS}: paced, or all at once; returns once all are answered."""
    for n in range(1, ROUNDS + 1):
        await discord.user_message(
            conv.channel, f"m{n}", user_id=conv.user, mention_bot=conv.guild is not None
        )
        if conv.paced:
            await discord.wait_for(lambda n=n: len(discord.texts(conv.channel)) >= n, timeout=30)
    await discord.wait_for(lambda: len(discord.texts(conv.channel)) >= ROUNDS, timeout=30)


async def test_discord_two_shards_in_two_processes_share_one_postgres(
    postgres: Any, tmp_path: Path
) -> None:
    """Shard 0 in process d0, shard 1 in process d1, one database. Members in six
    guilds (three per shard) and six DMs (shard 0) send five messages each, half of
    them one at a time, half all at once. Every channel shows exactly ``1:m1`` ..
    ``5:m5``, in order, once; the store's transcripts agree; each process received
    its shard's messages (and only those), and answered a channel whose messages only
    the other received (its lease was theirs already); the inbox and the outbox are
    empty at the end; both processes exit 0 on SIGTERM and leave the worker registry."""
    url = await _create_database(postgres)
    logs = [tmp_path / f"d{i}.log" for i in range(SHARDS)]
    started = time.monotonic()
    async with model_server() as llm, FakeDiscord() as discord:
        guilds = [discord.add_guild(f"g{i}", channels=CHANNELS) for i in range(GUILDS)]
        assert sorted(shard_for(g.id, SHARDS) for g in guilds) == [0, 0, 0, 1, 1, 1]
        users = iter(range(FIRST_USER, FIRST_USER + GUILDS * len(CHANNELS) + DMS))
        conversations = [
            Conversation(guild.channels[name], next(users), guild.id, paced=False)
            for guild in guilds
            for name in CHANNELS
        ]
        for _ in range(DMS):
            user = next(users)
            conversations.append(Conversation(discord.dm_channel(user), user, None, False))
        for index, conv in enumerate(conversations):
            conv.paced = index % 2 == 0
        # Two channels held by the process that does not receive their messages, as a
        # restarted worker finds the leases it had (it takes its own back at once): a DM
        # by d1, a guild channel of shard 1 by d0.
        next(c for c in conversations if c.guild is None).leased_to = "d1"
        next(c for c in conversations if c.shard == 1).leased_to = "d0"
        env = clean_env(
            DISCORD_BOT_TOKEN=discord.token,
            DISCORD_API_BASE_URL=discord.api_url,
            DISCORD_GATEWAY_URL=discord.gateway_url,
            DISCORD_SHARD_COUNT=str(SHARDS),
            OPENAI_API_KEY=API_KEY,
            OPENAI_BASE_URL=llm.base_url,
            TURBOBOT_DATABASE_URL=url,
        )
        await upgrade_schema(env)
        for conv in conversations:
            if conv.leased_to is not None:
                await sql(
                    url,
                    "INSERT INTO leases (channel, worker, incarnation, generation, expires_at) "
                    "VALUES ($1, $2, 'before', 1, now() + interval '1 hour')",
                    channel_column(conv.key),
                    conv.leased_to,
                )
        async with contextlib.AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(worker(env, f"d{i}", i, logs[i]))
                for i in range(SHARDS)
            ]

            def registered() -> int:  # each process registers its commands once ready
                return len(discord.calls_to("PUT", r"/applications/\d+/commands"))

            try:
                await discord.wait_for(
                    lambda: registered() >= SHARDS and len(discord.live_connections()) >= SHARDS,
                    timeout=60,
                )
            except TimeoutError as exc:
                raise AssertionError(read(logs)) from exc
            ready = time.monotonic()
            try:
                await asyncio.gather(*(talk(discord, conv) for conv in conversations))
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{read(logs)}") from exc
            talked = time.monotonic()
            # what each process holds now (every conversation is live: none is idle)
            held = await sql(
                url,
                "SELECT worker, channel FROM leases WHERE expires_at > now() ORDER BY channel",
            )
            for proc in procs:
                assert proc.returncode is None, read(logs)
                proc.send_signal(signal.SIGTERM)
            codes = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 60)
        # received: each shard's connection got its own users' messages, and only those
        received: dict[int, set[int]] = {}
        for conn in discord.connections:
            assert conn.shard is not None
            for event in conn.events("MESSAGE_CREATE"):
                if int(event["d"]["author"]["id"]) != discord.bot_id:
                    received.setdefault(conn.shard[0], set()).add(int(event["d"]["channel_id"]))
        identified = sorted(i["shard"] for i in discord.identifies)
        shown = {conv.channel: discord.texts(conv.channel) for conv in conversations}

    unconsumed = await sql(url, "SELECT count(*) AS n FROM inbox WHERE NOT consumed")
    unsent = await sql(url, "SELECT count(*) AS n FROM outbox WHERE NOT sent")
    store = SQLStore(url)
    await store.open()
    try:
        transcripts = {c.channel: await store.transcript(c.key) for c in conversations}
    finally:
        await store.aclose()
    registry = await sql(url, "SELECT count(*) AS n FROM workers")
    text = read(logs)
    for conv in conversations:
        assert shown[conv.channel] == expected(), (conv, shown[conv.channel], text[-4000:])
        said = [(line.role, line.text) for line in transcripts[conv.channel]]
        assert said == [
            (role, line)
            for n in range(1, ROUNDS + 1)
            for role, line in (("user", f"m{n}"), ("assistant", f"{n}:m{n}"))
        ], (conv, said)
    assert identified == [[0, SHARDS], [1, SHARDS]]  # one session per process, no more
    for shard in range(SHARDS):
        assert received.get(shard, set()) == {c.channel for c in conversations if c.shard == shard}
    # Every conversation's channel is held, by either process: the one that received a
    # message and the one told of it by NOTIFY both try to take its channel.
    assert len(held) == len(conversations), held
    holder = {parse_channel_column(row["channel"]): row["worker"] for row in held}
    assert set(holder.values()) <= {"d0", "d1"}, held
    for conv in conversations:
        if conv.leased_to is not None:  # so each process answered messages it never got
            assert holder[conv.key] == conv.leased_to != conv.receiver, (conv, held)
    assert unconsumed[0]["n"] == 0  # every message used
    assert unsent[0]["n"] == 0  # every reply sent
    assert codes == [0, 0], text[-4000:]
    assert registry[0]["n"] == 0  # each left the worker registry on its way out
    assert "Traceback" not in text, text[-4000:]

    crossed = sum(holder[c.key] != c.receiver for c in conversations)
    print(
        f"\n{len(conversations)} conversations x {ROUNDS} messages on 2 shards in 2 "
        f"processes: ready in {ready - started:.1f} s, answered in {talked - ready:.1f} s; "
        f"channels held: d0 {sum(r['worker'] == 'd0' for r in held)}, "
        f"d1 {sum(r['worker'] == 'd1' for r in held)}, {crossed} by the process that "
        "does not receive their messages"
    )


def read(logs: list[Path]) -> str:
    return "".join(f"--- {log.name}\n{log.read_text()}" for log in logs if log.exists())
