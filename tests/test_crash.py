"""The crash suite: ``turbobot run --platform telegram`` killed with SIGKILL at seeded
random points while many chats hold conversations, restarted each time.

Every chat runs tests/crash_bot.py (a question, a greeting, streamed generations, a
question with a timeout) against the fake Bot API and OpenAI servers on loopback; the
database (SQLite file, or PostgreSQL started by the test run) survives the kills. At
the end, for every chat:

- the stored transcript equals the uninterrupted one (each input once, each reply once);
- no input is lost or processed twice (the inbox holds nothing unconsumed);
- the model was asked again for a turn only when a kill fell while that turn's
  generation was in flight (an interrupted generation is redone, nothing else);
- every reply reached the chat; a reply shown twice is counted: it happens only when a
  kill falls between the platform accepting a reply and the bot committing that it
  was sent (the Bot API has no idempotency key), see README "Guarantees".

Size: ``CRASH_CHATS`` chats, ``CRASH_KILLS`` kills, ``CRASH_SEED`` (defaults: a reduced
run for CI). Full size: ``make crash`` (200 chats, 50 kills, on SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from fakes.telegram_server import FakeTelegram
from tests import crash_bot as bot
from tests.test_console import clean_env, spawn_turbobot
from turbobot import ChannelKey
from turbobot.sql import SQLStore

pytestmark = pytest.mark.slow

CHATS = int(os.environ.get("CRASH_CHATS", "24"))
KILLS = int(os.environ.get("CRASH_KILLS", "6"))
SEED = int(os.environ.get("CRASH_SEED", "20261204"))
FIRST_CHAT = 7000
#: the model server's API key the bots are given (never to be logged or stored)
API_KEY = "sk-crash-test-key"
#: seconds within which the bot commits that a reply was sent once the chat shows it
#: (generous: the event loop of a bot with many chats lags)
COMMIT_MOMENT = 1.0
#: seconds a request sent by a bot being killed may reach the fake after the kill
SLACK = 0.5


def user_messages(chat: int) -> list[str]:
    """What the user of ``chat`` sends, in order."""
    return ["hi", f"name{chat}", *(f"c{chat} t{turn}" for turn in range(1, bot.TURNS + 1))]


def answer(text: str) -> str:
    return f"Echo: {text.upper()}"


def bot_lines(chat: int) -> list[str]:
    """What the bot says in ``chat``, in order, uninterrupted."""
    said = user_messages(chat)
    return [
        bot.QUESTION,
        bot.greeting(said[1]),
        *(answer(text) for text in said[2:]),
        bot.ANYTHING_ELSE,
        bot.TIMED_OUT,
    ]


def transcript(chat: int) -> list[tuple[str, str]]:
    """The uninterrupted conversation, as the store's transcript keeps it."""
    said, lines = user_messages(chat), bot_lines(chat)
    expected = [("user", said[0]), ("assistant", lines[0]), ("user", said[1])]
    expected.append(("assistant", lines[1]))
    for text, reply in zip(said[2:], lines[2:], strict=False):
        expected += [("user", text), ("assistant", reply)]
    expected += [("assistant", bot.ANYTHING_ELSE), ("assistant", bot.TIMED_OUT)]
    return expected


def stream_reply(body: dict[str, Any]) -> Reply:
    """A deterministic answer, streamed slowly enough for kills to land mid-stream."""
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    return Reply(content=answer(users[-1]), chunk_delay=0.03)


class BotProcess:
    """The bot process of a crash run: started on a platform, SIGKILLed, stopped.

    The runs (dataclasses) declare the fields used here.
    """

    env: dict[str, str]
    log: Path
    proc: asyncio.subprocess.Process | None
    kill_times: list[float]
    starts: int
    log_level: str

    async def spawn(self, platform: str) -> None:
        with self.log.open("ab") as log:
            self.proc = await spawn_turbobot(
                self.env,
                "--log-level",
                self.log_level,
                "run",
                "tests.crash_bot:crash_chat",
                "--platform",
                platform,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        self.starts += 1

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.kill_times.append(time.monotonic())
        assert await self.proc.wait() == -signal.SIGKILL, self.log.read_text()[-3000:]

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 60)


@dataclass
class Run(BotProcess):
    """One crash run: the fakes, the bot process, the kills and what they hit."""

    telegram: FakeTelegram
    llm: FakeOpenAI
    env: dict[str, str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    kill_times: list[float] = field(default_factory=list)
    starts: int = 0
    log_level: str = "WARNING"

    async def start(self) -> None:
        await self.spawn("telegram")

    def events(self) -> int:
        return len(self.telegram.calls) + len(self.llm.requests)


async def assert_no_secrets(url: str, log: Path, *secrets: str) -> None:
    """No secret in any row of any table of the database, nor in the bot's log."""
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import create_async_engine

    from turbobot.sql.schema import metadata

    engine = create_async_engine(url)
    rows = 0
    try:
        async with engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in await conn.execute(select(table)):
                    rows += 1
                    text = " ".join(str(value) for value in row)
                    for secret in secrets:
                        assert secret not in text, f"a secret is stored in {table.name}"
    finally:
        await engine.dispose()
    assert rows > 0
    logged = await asyncio.to_thread(log.read_bytes)
    for secret in secrets:
        assert secret.encode() not in logged, "a secret reached the log"


def progress(run: Run, chat: int) -> int:
    """How many of the chat's expected bot lines are on screen, in order."""
    expected, seen = bot_lines(chat), 0
    for text in run.telegram.texts(chat, plain=True):
        if seen < len(expected) and text == expected[seen]:
            seen += 1
    return seen


def assert_redone_only_when_interrupted(
    llm: FakeOpenAI,
    kill_times: list[float],
    shown_at: Callable[[int, str, float], float | None],
    chats: int,
) -> int:
    """The model was asked again for a turn only if a kill fell while it was in flight;
    returns how many generations were redone.

    A turn is in flight from the request (received by the fake just after a kill if the
    dying bot had sent it) until its reply is shown in the chat (``shown_at(chat, text,
    after)``: when ``text`` was first shown there after ``after``) and, a moment later,
    committed as sent. A turn asked again must have had a kill in that span.
    """
    asked: dict[str, list[float]] = {}
    for index, body in enumerate(llm.requests):
        last = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        asked.setdefault(last, []).append(llm.request_times[index])
    for text, tries in asked.items():
        chat = int(text.split()[0].removeprefix("c"))
        for start, again in itertools.pairwise(tries):
            shown = shown_at(chat, answer(text), start)
            assert any(
                start - SLACK <= k <= again and (shown is None or k - shown < COMMIT_MOMENT)
                for k in kill_times
            ), (
                f"the model was asked again for {text!r} though no kill interrupted it "
                f"(asked at {start:.2f}, shown at {shown}, again at {again:.2f}; "
                f"kills at {[round(k, 2) for k in kill_times]})"
            )
    assert len(asked) == chats * bot.TURNS
    return sum(len(t) - 1 for t in asked.values())


async def drive(run: Run, chats: list[int], kills: int, rng: random.Random) -> None:
    """Send each chat's messages as its replies arrive; kill and restart the bot at the
    seeded points (the n-th user message pushed, then r more calls to the fakes)."""
    total = sum(len(user_messages(c)) for c in chats)
    points = sorted(rng.sample(range(1, int(total * 0.9)), kills))
    delays = [rng.randrange(0, 25) for _ in points]
    pushed = dict.fromkeys(chats, 0)
    count = 0
    armed: int | None = None  # the event count at which to kill
    armed_at = 0.0
    deadline = time.monotonic() + 120 + 6 * kills + CHATS
    while True:
        for chat in chats if armed is None else ():  # (no pushes while a kill is armed)
            said = user_messages(chat)
            # message k is sent once the reply to message k-1 is on screen
            while pushed[chat] < len(said) and pushed[chat] <= progress(run, chat):
                run.telegram.message(chat, said[pushed[chat]])
                pushed[chat] += 1
                count += 1
                if points and count >= points[0]:
                    points.pop(0)
                    armed, armed_at = run.events() + delays.pop(0), time.monotonic()
                    break
            if armed is not None:
                break
        # (a bot with nothing left to do makes no calls: the kill then comes 2 s later)
        if armed is not None and (run.events() >= armed or time.monotonic() - armed_at > 2):
            armed = None
            await run.kill()
            await run.start()
        if all(progress(run, c) == len(bot_lines(c)) for c in chats) and armed is None:
            return
        if time.monotonic() > deadline:
            stuck = {c: progress(run, c) for c in chats if progress(run, c) < len(bot_lines(c))}
            raise AssertionError(f"chats stuck (chat: lines shown): {stuck}")
        with contextlib.suppress(TimeoutError):  # (woken by any call to the fake)
            await run.telegram.wait_until(lambda: False, timeout=0.2)


def bot_env(
    telegram: FakeTelegram, llm: FakeOpenAI, database_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a bot on the fake Bot API and model server (keys: see the
    secrets checks)."""
    return clean_env(
        TELEGRAM_BOT_TOKEN=telegram.token,
        TELEGRAM_API_BASE_URL=telegram.base_url,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=llm.base_url,
        TURBOBOT_DATABASE_URL=database_url,
        **extra,
    )


@contextlib.asynccontextmanager
async def model_server() -> AsyncIterator[FakeOpenAI]:
    """The fake model server of the crash suites (deterministic, slowly streamed)."""
    llm = FakeOpenAI(stream_reply)
    await llm.start()
    try:
        yield llm
    finally:
        await llm.stop()


async def upgrade_schema(env: dict[str, str]) -> None:
    """``turbobot db upgrade`` on the bot's database, as a deployment runs it first."""
    upgrade = await spawn_turbobot(env, "db", "upgrade", stdin=asyncio.subprocess.DEVNULL)
    _, err = await upgrade.communicate()
    assert upgrade.returncode == 0, err


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeTelegram, FakeOpenAI]]:
    async with model_server() as llm, FakeTelegram() as telegram:
        yield telegram, llm


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_kills_at_random_points_lose_and_repeat_nothing(
    store_url: str, fakes: tuple[FakeTelegram, FakeOpenAI], tmp_path: Path
) -> None:
    telegram, llm = fakes
    env = bot_env(telegram, llm, store_url)
    await upgrade_schema(env)
    run = Run(telegram, llm, env, tmp_path / "bot.log")
    chats = [FIRST_CHAT + i for i in range(CHATS)]
    await run.start()
    await drive(run, chats, KILLS, random.Random(SEED))
    assert await run.stop() == 0, run.log.read_text()[-3000:]
    assert len(run.kill_times) == KILLS

    store = SQLStore(store_url)
    await store.open()
    try:
        lost, duplicated_inputs = [], []
        for chat in chats:
            key = ChannelKey("telegram", str(chat))
            got = [(line.role, line.text) for line in await store.transcript(key)]
            assert got == transcript(chat), chat
            assert await store.inbox(key) == [], f"chat {chat}: inputs left unconsumed"
            said = [text for role, text in got if role == "user"]
            lost += [t for t in user_messages(chat) if t not in said]
            duplicated_inputs += [t for t, n in Counter(said).items() if n > 1]
        assert lost == [] and duplicated_inputs == []
    finally:
        await store.aclose()

    def shown_at(chat: int, text: str, after: float) -> float | None:
        times = [m.sent_at for m in telegram.sent(chat) if m.plain == text and m.sent_at >= after]
        return min(times, default=None)

    extra_calls = assert_redone_only_when_interrupted(llm, run.kill_times, shown_at, CHATS)

    # Every reply reached its chat; count those shown twice.
    duplicates = 0
    kinds: Counter[str] = Counter()
    for chat in chats:
        shown = telegram.texts(chat, plain=True)
        expected = bot_lines(chat)
        assert progress(run, chat) == len(expected), chat
        extra = Counter(shown) - Counter(expected)
        assert set(extra) <= set(expected), f"chat {chat}: unexpected messages {extra}"
        duplicates += sum(extra.values())
        for text in extra:
            times = [round(m.sent_at, 2) for m in telegram.sent(chat) if m.plain == text]
            kinds[text.split(":")[0].split(",")[0]] += 1
            print(f"shown twice in {chat}: {text!r} at {times}")
    print(
        f"\ncrash run ({store_url.split(':')[0]}): {CHATS} chats, {KILLS} kills, seed {SEED}: "
        f"{sum(len(user_messages(c)) for c in chats)} inputs, 0 lost, 0 processed twice; "
        f"{extra_calls} generations redone after a kill; {duplicates} replies shown twice "
        f"({dict(kinds)}); kills at {[round(k, 2) for k in run.kill_times]}"
    )
    await assert_no_secrets(store_url, run.log, telegram.token, API_KEY)


# -- a kill during a schema upgrade ----------------------------------------------------

UPGRADE_KILLS = int(os.environ.get("CRASH_UPGRADE_KILLS", "4"))


def _sqlite_busy(path: Path) -> bool:
    return any(os.path.exists(f"{path}{suffix}") for suffix in ("-journal", "-wal"))


def _remove_sidecars(path: Path) -> None:
    for suffix in ("-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")


async def _database_busy(url: str, path: Path | None) -> bool:
    """Whether a process other than this test works on the database now."""
    if path is not None:  # SQLite: its journal or write-ahead log exists while it writes
        return _sqlite_busy(path)
    import asyncpg

    database = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        others = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return bool(others)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_kill_during_a_schema_upgrade_leaves_a_database_that_upgrades(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``turbobot db upgrade`` (0001 → head on a database holding a conversation) killed
    as soon as it touches the database, plus a seeded few milliseconds: the database
    stays at a whole revision, and the next upgrade finishes with nothing lost."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from tests.conftest import _create_database
    from tests.test_stored_once import KEY as OLD_KEY
    from tests.test_stored_once import echo_chat, seed_0001
    from turbobot.sql.migrate import current_revision, drift, head_revision

    rng = random.Random(SEED)
    interrupted = 0
    for attempt in range(UPGRADE_KILLS):
        if kind == "sqlite":
            path: Path | None = tmp_path / f"upgrade{attempt}.db"
            url = f"sqlite+aiosqlite:///{path}"
        else:
            path = None
            url = await _create_database(request.getfixturevalue("postgres"))
        incoming = await seed_0001(url)
        if path is not None:
            _remove_sidecars(path)  # (seed_0001's own, now closed)
        env = clean_env(TURBOBOT_DATABASE_URL=url)
        proc = await spawn_turbobot(env, "db", "upgrade", stdin=asyncio.subprocess.DEVNULL)
        # Polling the database (no event tells when another process starts on it) ...
        while proc.returncode is None and not await _database_busy(url, path):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        # ... then the kill lands a seeded few milliseconds into the upgrade's work.
        await asyncio.sleep(rng.uniform(0, 0.03))
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                revision = await conn.run_sync(current_revision)
        finally:
            await engine.dispose()
        assert revision in ("0001", head_revision()), revision
        interrupted += revision == "0001" and proc.returncode == -signal.SIGKILL

        again = await spawn_turbobot(env, "db", "upgrade", stdin=asyncio.subprocess.DEVNULL)
        _, err = await again.communicate()
        assert again.returncode == 0, err
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                assert await conn.run_sync(drift) == []
        finally:
            await engine.dispose()
        store = SQLStore(url)
        await store.open()
        try:
            record = await store.load_conversation(OLD_KEY, echo_chat.ref)
            assert record is not None
            assert record.journal[0].value == {"text": "old text", "incoming": incoming}
        finally:
            await store.aclose()
    print(f"\nupgrade kills ({kind}): {UPGRADE_KILLS}, {interrupted} mid-upgrade")
    assert interrupted >= 1, "no kill landed during the upgrade: the test tested nothing"


# -- a power cut (SQLite) ---------------------------------------------------------------

POWER_CUTS = int(os.environ.get("CRASH_POWER_CUTS", "10"))
_WAL_HEADER, _FRAME_HEADER = 32, 24


def _uncommitted_tail(wal: bytes) -> int:
    """Where the WAL's last complete transaction ends: frames after it belong to a commit
    still being written, which a power cut may lose or tear."""
    if len(wal) < _WAL_HEADER:
        return len(wal)
    page_size = int.from_bytes(wal[8:12], "big")
    salts = wal[16:24]
    end, offset = _WAL_HEADER, _WAL_HEADER
    while offset + _FRAME_HEADER + page_size <= len(wal):
        header = wal[offset : offset + _FRAME_HEADER]
        if header[8:16] != salts:
            break  # a frame of an earlier generation of the log: not part of it
        offset += _FRAME_HEADER + page_size
        if int.from_bytes(header[4:8], "big"):  # a commit frame
            end = offset
    return end


def _power_cut_copies(db: Path, into: Path, rng: random.Random, number: int) -> list[Path]:
    """Copies of the database as a power cut could leave it: its files as they are, then
    with the uncommitted tail of the write-ahead log cut short or torn."""
    wal = Path(f"{db}-wal").read_bytes() if Path(f"{db}-wal").exists() else b""
    main = db.read_bytes()
    tail = _uncommitted_tail(wal)
    variants = [wal]
    if len(wal) > tail:
        variants.append(wal[: rng.randrange(tail, len(wal))])
        cut = rng.randrange(tail, len(wal))
        torn = bytes(rng.randrange(256) for _ in range(min(512, len(wal) - cut)))
        variants.append(wal[:cut] + torn + wal[cut + len(torn) :])
    copies = []
    for index, variant in enumerate(variants):
        copy = into / f"cut{number}-{index}.db"
        copy.write_bytes(main)
        if variant:
            Path(f"{copy}-wal").write_bytes(variant)
        copies.append(copy)
    return copies


async def test_a_power_cut_leaves_a_sqlite_database_that_opens_consistent(
    fakes: tuple[FakeTelegram, FakeOpenAI], tmp_path: Path
) -> None:
    """The bot is frozen (SIGSTOP) at seeded points while chats talk, its database files
    copied (as they are on disk at that instant, and with the log's unfinished commit
    cut or torn, as a power cut may leave it), and thawed. Every copy passes SQLite's
    integrity check, opens as a store, and holds, per chat, a beginning of the
    uninterrupted conversation: nothing half-committed, nothing out of order."""
    import sqlite3

    telegram, llm = fakes
    path = tmp_path / "bot.db"
    env = bot_env(telegram, llm, f"sqlite+aiosqlite:///{path}")
    rng = random.Random(SEED)
    run = Run(telegram, llm, env, tmp_path / "bot.log")
    chats = [FIRST_CHAT + i for i in range(CHATS)]
    cuts: list[Path] = []

    async def freeze_and_copy(driving: asyncio.Future[None]) -> None:
        for number in range(POWER_CUTS):
            target = run.events() + rng.randrange(5, 60)
            # (once the chats are done, the cuts left are taken of the idle database:
            # a run with fewer events than the cuts wait for no longer times out)
            while run.events() < target and not driving.done():
                with contextlib.suppress(TimeoutError):  # (woken by any call to the fake)
                    await telegram.wait_until(lambda t=target: run.events() >= t, timeout=0.5)
            assert run.proc is not None
            run.proc.send_signal(signal.SIGSTOP)
            try:
                cuts.extend(_power_cut_copies(path, tmp_path, rng, number))
            finally:
                run.proc.send_signal(signal.SIGCONT)

    await run.start()
    driving = asyncio.ensure_future(drive(run, chats, 0, rng))
    copying = asyncio.ensure_future(freeze_and_copy(driving))
    await driving
    await copying
    assert await run.stop() == 0

    for copy in cuts:
        with contextlib.closing(sqlite3.connect(copy)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], copy
        store = SQLStore(f"sqlite+aiosqlite:///{copy}")
        await store.open()
        try:
            await store.recovery()
            for chat in chats:
                lines = await store.transcript(ChannelKey("telegram", str(chat)))
                got = [(line.role, line.text) for line in lines]
                assert got == transcript(chat)[: len(got)], (copy, chat, got)
        finally:
            await store.aclose()
    torn = sum(1 for c in cuts if not c.name.endswith("-0.db"))
    print(f"\npower cuts: {POWER_CUTS} snapshots, {len(cuts)} copies ({torn} with a cut log)")
    assert len(cuts) >= POWER_CUTS
