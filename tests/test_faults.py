"""Fault injection: the CLI bot on Telegram while the model server and the Bot API fail
at a seeded rate, then stop failing.

The fake OpenAI server answers a share ``FAULT_RATE`` of requests with a fault (a
request that outlives the client's timeout, a connection reset, 429 with retry-after,
500, malformed JSON, a stream cut mid-way, a very slow stream); the fake Bot API
answers a share of sends, drafts, typing indicators and polls with 429 or 5xx, drops
the connection, or (sends) carries the call out but answers too late. Each
chat's user sends their next message once the bot answered their last one (with a
reply or an apology), as people do. Then the faults stop; every conversation must
finish: each input in the transcript once, in order, and every message the bot sent
one of the template's lines, an echo of what the user said, or the apology (a clear
message, never silence or a traceback). No channel is left stuck, and the process is
the same one throughout (recovery without a restart).

Meanwhile the database's disk is full for at least 8 s, and until the bot has met it (a
tmpfs of its own, where the test may mount one: as root, as CI runs). The same users
and checks run on Discord too (in one process, with REST 429s and 5xx and dropped
gateway connections).

Size: ``FAULT_CHATS`` chats (default 16), ``FAULT_RATE`` (0.2), ``CRASH_SEED``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from fakes.telegram_server import DISCONNECT, TIMEOUT, FakeTelegram
from tests import crash_bot as bot
from tests.conftest import fill
from tests.test_crash import API_KEY, SEED, Run, answer, assert_no_secrets, bot_env
from turbobot import ChannelKey
from turbobot.runtime import Notices
from turbobot.sql import SQLStore
from turbobot.template import INTERRUPTED

pytestmark = pytest.mark.slow

CHATS = int(os.environ.get("FAULT_CHATS", "16"))
RATE = float(os.environ.get("FAULT_RATE", "0.2"))
FIRST_CHAT = 8000
#: seconds the bot's requests to the model may take (TURBOBOT_LLM_TIMEOUT)
LLM_TIMEOUT = 1.0
APOLOGY = Notices().apology

LLM_FAULTS = ("timeout", "reset", "429", "500", "malformed", "cut", "slow")
PLATFORM_FAULTS = {
    # TIMEOUT: sent, but answered after the client gave up (PTB waits 5 s): it sends
    # again, and the user sees the reply twice (at-least-once replies, see the README)
    "sendMessage": (429, 502, DISCONNECT, TIMEOUT),
    "sendMessageDraft": (500, DISCONNECT),
    "sendChatAction": (500,),
    "getUpdates": (502, DISCONNECT),
}
#: seconds a TIMEOUT answer is held back: longer than PTB's 5 s read timeout
PLATFORM_TIMEOUT = 6.0
#: seconds the database's disk is full at least (from a message sent once every chat began)
DISK_FULL_FOR = 8.0


class FaultyModel:
    """Answers like the crash suite's model, but a share of requests fail."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rate = RATE
        self.injected: Counter[str] = Counter()

    def __call__(self, body: dict[str, Any]) -> Reply:
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        content = answer(users[-1])
        if self.rng.random() >= self.rate:
            return Reply(content=content, chunk_delay=0.01)
        kind = self.rng.choice(LLM_FAULTS)
        self.injected[kind] += 1
        if kind == "timeout":
            return Reply(content=content, delay=LLM_TIMEOUT * 3)
        if kind == "reset":
            return Reply(content=content, cut_after=0)
        if kind == "429":
            return Reply(status=429, headers={"retry-after": "1"})
        if kind == "500":
            return Reply(status=500)
        if kind == "malformed":
            return Reply(raw="{this is not json")
        if kind == "cut":
            return Reply(content=content, cut_after=2)
        return Reply(content=content, chunk_delay=0.3)  # slow: ~2 s for an answer


def next_message(chat: int, turn: int) -> str:
    """What the user of ``chat`` sends as their ``turn``-th message."""
    return "hi" if turn == 0 else f"name{chat}" if turn == 1 else f"c{chat} m{turn}"


def allowed_lines(chat: int, said: list[str]) -> set[str]:
    """Every line the bot may show in ``chat`` after the user said ``said``.

    (A user who writes while a retried answer is on its way may end the conversation
    early and start another: also fine, as long as every line is one of these.)
    """
    return {
        bot.QUESTION,
        bot.greeting(f"name{chat}"),
        *(bot.greeting(text) for text in said),
        bot.ANYTHING_ELSE,
        bot.TIMED_OUT,
        APOLOGY,
        *(answer(text) for text in said),
        *(f"Goodbye, {text}!" for text in said),
    }


def _filling(filler: Path | None) -> bool:
    """The disk is full now (the other faults clear only after it was freed)."""
    return filler is not None and filler.exists()


def _met_full_disk(run: Run) -> bool:
    """The bot logged that it could not commit for lack of room."""
    return run.log.exists() and "database or disk is full" in run.log.read_text()


def ended(shown: list[str]) -> bool:
    """The conversation's last line is on screen: the timeout's, or the goodbye to a
    message sent before (or just after) "Anything else?" was shown."""
    return any(text == bot.TIMED_OUT or text.startswith("Goodbye, ") for text in shown)


async def test_faults_of_the_model_and_the_platform_end_well_without_a_restart(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    try:  # the database on a disk of its own, full for a while (where it can be mounted)
        disk: Path | None = request.getfixturevalue("small_disk")
    except pytest.skip.Exception:
        disk = None
    store_url = f"sqlite+aiosqlite:///{(disk or tmp_path) / 'bot.db'}"
    filler = disk / "filler" if disk is not None else None
    full_for = 0.0
    rng = random.Random(SEED)
    model = FaultyModel(rng)
    llm = FakeOpenAI(model)
    await llm.start()
    telegram = FakeTelegram()
    await telegram.start()
    platform_faults = []
    for method, statuses in PLATFORM_FAULTS.items():
        for status in statuses:
            share = RATE / len(statuses)
            platform_faults.append(
                telegram.fail(
                    method,
                    status=status,
                    delay=PLATFORM_TIMEOUT,
                    times=None,
                    when=lambda params, share=share: rng.random() < share,
                )
            )
    env = bot_env(telegram, llm, store_url, TURBOBOT_LLM_TIMEOUT=str(LLM_TIMEOUT))
    # DEBUG: every request is logged, and none may show the token or the key
    run = Run(telegram, llm, env, tmp_path / "bot.log", log_level="DEBUG")
    chats = [FIRST_CHAT + i for i in range(CHATS)]
    said: dict[int, list[str]] = {c: [] for c in chats}
    answered: dict[int, int] = dict.fromkeys(chats, 0)  # bot messages seen at the last send
    try:
        await run.start()
        started = time.monotonic()
        cleared = False
        deadline = started + 240
        while True:
            running = all(len(said[c]) >= 2 for c in chats)  # (a bot that has started)
            for chat in chats:
                shown = telegram.texts(chat, plain=True)
                done = bot.ANYTHING_ELSE in shown or ended(shown)
                if not done and (not said[chat] or len(shown) > answered[chat]):
                    if filler is not None and not full_for and running:
                        # The disk fills just before a message arrives, so the bot has
                        # something to commit while it is full (its inbox row).
                        fill(filler)
                        full_for = time.monotonic()
                    text = next_message(chat, len(said[chat]))
                    telegram.message(chat, text)
                    said[chat].append(text)
                    answered[chat] = len(shown)
            finished = [c for c in chats if ended(telegram.texts(c, plain=True))]
            half_done = len(finished) >= len(chats) // 2
            now = time.monotonic()
            if _filling(filler) and now > full_for + DISK_FULL_FOR and _met_full_disk(run):
                assert filler is not None
                filler.unlink()  # (held full until the bot met it, however long that took)
                full_for = now - full_for
            elif _filling(filler) and now > full_for + 60:
                raise AssertionError("the disk was full for 60 s and the bot never said so")
            if not cleared and (half_done or now > started + 60) and not _filling(filler):
                # The faults stop: whatever waits or retries must now finish by itself.
                cleared = True
                model.rate = 0.0
                for fault in platform_faults:
                    telegram.faults.remove(fault)
            if len(finished) == len(chats):
                break
            if time.monotonic() > deadline:
                stuck = {c: telegram.texts(c, plain=True)[-2:] for c in chats if c not in finished}
                raise AssertionError(f"chats stuck after the faults cleared: {stuck}")
            with contextlib.suppress(TimeoutError):  # (woken by any call to the fake)
                await telegram.wait_until(lambda: False, timeout=0.2)
        assert run.proc is not None and run.proc.returncode is None, "the bot died"
        assert await run.stop() == 0, run.log.read_text()[-3000:]
        assert run.starts == 1
    finally:
        if run.proc is not None and run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()
        await telegram.stop()
        await llm.stop()

    store = SQLStore(store_url)
    await store.open()
    apologies = 0
    try:
        for chat in chats:
            lines = await store.transcript(ChannelKey("telegram", str(chat)))
            users = [line.text for line in lines if line.role == "user"]
            assert users == said[chat], chat  # each input once, in order, none lost
            allowed = allowed_lines(chat, said[chat])
            shown = telegram.texts(chat, plain=True)
            assert set(shown) <= allowed, (
                f"chat {chat}: {set(shown) - allowed}; said {said[chat]}; shown {shown}; "
                f"transcript {[(line.role, line.text) for line in lines]}"
            )
            echoes = [line.text for line in lines if line.text.startswith("Echo: ")]
            assert len(echoes) >= bot.TURNS, (chat, echoes)  # the first conversation's
            assert await store.inbox(ChannelKey("telegram", str(chat))) == [], chat
            apologies += shown.count(APOLOGY)
    finally:
        await store.aclose()
    kinds = {DISCONNECT: "disconnect", TIMEOUT: "timeout"}
    hits = {f"{f.method} {kinds.get(f.status, f.status)}": f.hits for f in platform_faults}
    print(
        f"\nfaults ({CHATS} chats, rate {RATE}, seed {SEED}): model {dict(model.injected)}; "
        f"platform {hits}; disk full for {full_for:.1f} s; "
        f"{sum(len(s) for s in said.values())} inputs, 0 lost; "
        f"{apologies} apologies; one process throughout"
    )
    assert sum(model.injected.values()) > 0 and sum(hits.values()) > 0
    if disk is not None:  # the store met the full disk, and went on once it had room
        logged = run.log.read_text()
        assert full_for > 0 and "database or disk is full" in logged
        assert "commits go through again" in logged
    await assert_no_secrets(store_url, run.log, telegram.token, API_KEY)


# -- Discord ----------------------------------------------------------------------------

#: REST faults on sending and editing messages (typing indicators too), by status
DISCORD_FAULTS = (429, 500, 502)


async def test_faults_of_the_model_and_discord_end_well_without_a_restart(tmp_path: Path) -> None:
    """The same users and checks on Discord, in one process: the model fails as above;
    Discord answers bursts of 429s and 5xx to sends, edits and typing, and drops the
    gateway connection (the client resumes and gets what it missed)."""
    from fakes.discord_server import FakeDiscord
    from tests.conftest import fast_llm
    from tests.test_discord import running

    rng = random.Random(SEED)
    model = FaultyModel(rng)
    server = FakeOpenAI(model)
    await server.start()
    users = [FIRST_CHAT + 500 + i for i in range(CHATS)]
    said: dict[int, list[str]] = {u: [] for u in users}
    answered = dict.fromkeys(users, 0)
    rest_faults: Counter[int] = Counter()
    drops = 0
    try:
        async with (
            FakeDiscord() as discord,
            fast_llm(server) as llm,
            SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
            running(discord, bot.crash_chat, llm, store) as (_adapter, runtime),
        ):
            dms = {u: discord.dm_channel(u) for u in users}

            def shown(user: int) -> list[str]:
                return [m["content"] for m in discord.messages(dms[user])]

            started = time.monotonic()
            cleared = False
            while True:
                if not cleared:
                    if rng.random() < 2 * RATE:  # the next 2 such requests fail
                        status = rng.choice(DISCORD_FAULTS)
                        discord.fail(
                            "*", r"/channels/\d+/(messages(/\d+)?|typing)", status=status, times=2
                        )
                        rest_faults[status] += 2
                    # at least once, when every user is talking; then at random
                    talking = all(len(said[u]) >= 2 for u in users)
                    if talking and (not drops or rng.random() < RATE / 2):
                        await discord.disconnect(1006)  # a dropped TCP connection
                        drops += 1
                for user in users:
                    seen = shown(user)
                    done = bot.ANYTHING_ELSE in seen or ended(seen)
                    if not done and (not said[user] or len(seen) > answered[user]):
                        text = next_message(user, len(said[user]))
                        await discord.user_message(dms[user], text, user_id=user)
                        said[user].append(text)
                        answered[user] = len(seen)
                finished = [u for u in users if ended(shown(u))]
                if not cleared and (
                    len(finished) >= len(users) // 2 or time.monotonic() > started + 60
                ):
                    cleared = True
                    model.rate = 0.0
                    discord.faults.clear()
                if len(finished) == len(users):
                    break
                if time.monotonic() > started + 240:
                    stuck = {u: shown(u)[-2:] for u in users if u not in finished}
                    raise AssertionError(f"chats stuck after the faults cleared: {stuck}")
                with contextlib.suppress(TimeoutError):
                    await discord.wait_for(lambda: False, timeout=0.2)
            await runtime.join()
            apologies = 0
            for user in users:
                key = ChannelKey("discord", str(dms[user]))
                lines = await store.transcript(key)
                assert [line.text for line in lines if line.role == "user"] == said[user], user
                allowed = allowed_lines(user, said[user])
                # a stream the model broke off stays on screen, marked (the apology follows)
                cut = {
                    text
                    for text in shown(user)
                    if text.endswith(INTERRUPTED)
                    and any(line.startswith(text.removesuffix(INTERRUPTED)) for line in allowed)
                }
                assert set(shown(user)) - cut <= allowed, (user, set(shown(user)) - allowed)
                assert await store.inbox(key) == [], user
                apologies += shown(user).count(APOLOGY)
    finally:
        await server.stop()
    print(
        f"\nfaults on Discord ({CHATS} chats, rate {RATE}, seed {SEED}): model "
        f"{dict(model.injected)}; REST {dict(rest_faults)}; {drops} dropped connections; "
        f"{sum(len(s) for s in said.values())} inputs, 0 lost; {apologies} apologies"
    )
    assert sum(model.injected.values()) > 0 and sum(rest_faults.values()) > 0 and drops > 0
