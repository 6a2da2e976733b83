"""The bad-input battery: one table of hostile and odd inputs, sent through each
adapter (console, Telegram, Discord) with the real libraries against the fakes, each
with its defined outcome. Every case runs in a chat of its own, all at once, then the
same chat gets one more message: one user's bad input never stops their channel nor
touches another's, and nothing is left unread in the inbox.

Platform-only inputs (edits, deletions, bots, the bot itself, repeated updates, a chat
the bot was removed from) have their tests below the table.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakes.discord_server import FakeDiscord
from fakes.telegram_server import FakeTelegram
from tests.bad_input_bot import BREAK, echo, probe
from tests.test_console import clean_env, communicate, spawn_turbobot
from tests.test_discord import running as discord_running
from tests.test_telegram import running as telegram_running
from turbobot.chat import ChannelKey
from turbobot.llm.scripted import ScriptedLLM
from turbobot.runtime import Notices, RuntimeSettings
from turbobot.sql import SQLStore
from turbobot.store import BaseStore

N = Notices()
CAP = RuntimeSettings().max_input_chars
MEGABYTE = "x" * (1 << 20)
#: what every channel gets after its case: it must still be answered
AFTER = "and now?"


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    #: the replies, in order
    replies: list[str]
    #: platforms that cannot carry the text (the console reads lines)
    skip: frozenset[str] = field(default_factory=frozenset)
    #: other replies on some platforms
    on: dict[str, list[str]] = field(default_factory=dict)

    def replies_on(self, platform: str) -> list[str]:
        return self.on.get(platform, self.replies)


CASES = [
    Case("plain", "hello", [echo("hello")]),
    Case("whitespace only", " \t ", []),  # nothing to read: every adapter passes it by
    Case("empty", "", [], skip=frozenset({"discord"})),  # (Discord sends no empty message)
    Case("1 MB", MEGABYTE, [N.too_long.format(limit=CAP), echo(MEGABYTE[:CAP])]),
    Case("NUL bytes", "a\x00b\x00", [N.unreadable, echo("a\ufffdb\ufffd")]),
    Case(
        "lone surrogate",
        "a\ud800b",
        [N.unreadable, echo("a\ufffdb")],
        # the console reads bytes (see "invalid UTF-8"); Discord's gateway, UTF-8 JSON,
        # cannot carry one: it arrives as U+FFFD
        skip=frozenset({"console"}),
        on={"discord": [echo("a\ufffdb")]},
    ),
    Case("RTL, emoji, CJK", "שלום 👋🏽 你好 مرحبا", [echo("שלום 👋🏽 你好 مرحبا")]),
    Case(
        "Unicode separators",
        "one\u2028two\u2029three\u200bfour\u0085five",
        [echo("one\u2028two\u2029three\u200bfour\u0085five")],
    ),
    Case(
        "markup that breaks formatting",
        "*a _b `c <b>d</i> &amp; [e](javascript:alert(1)) ||f",
        [echo("*a _b `c <b>d</i> &amp; [e](javascript:alert(1)) ||f")],
    ),
    Case("command with arguments", "/cancel right now", [N.cancel_nothing]),
    Case("unknown command", "/frobnicate x", [N.unknown_command.format(command="frobnicate")]),
    Case("malformed command", "/ start", [echo("/ start")]),
    Case("a slash alone", "/", [echo("/")]),
    Case("an overlong command word", "/" + "a" * 40, [echo("/" + "a" * 40)]),
    Case(
        "a command for another bot",
        "/start@someone_else_bot",
        [echo("/start@someone_else_bot")],
        on={"console": [N.started]},  # a console bot has no name: every /start is its own
    ),
    Case("the template raises", BREAK, [N.failure]),
]


def expected(case: Case, platform: str) -> list[str]:
    return [*case.replies_on(platform), echo(AFTER)]


def cases_for(platform: str) -> list[Case]:
    return [case for case in CASES if platform not in case.skip]


async def assert_nothing_left(store: BaseStore, keys: list[ChannelKey]) -> None:
    """Every message was used: none waits in an inbox."""
    assert (await store.recovery()).inbox == []
    for key in keys:
        assert await store.inbox(key) == []


def assert_the_break_was_logged(caplog: pytest.LogCaptureFixture, key: ChannelKey) -> None:
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and "failed" in r.message]
    assert any(str(key) in r.message for r in failures), [r.message for r in failures]


# -- Telegram ---------------------------------------------------------------------------


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


async def test_the_battery_through_telegram(
    telegram: FakeTelegram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = cases_for("telegram")
    chats = {case.name: 5000 + i for i, case in enumerate(cases)}
    flood = 6000
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        telegram_running(telegram, probe, ScriptedLLM(), store),  # type: ignore[arg-type]
    ):
        for case in cases:
            telegram.message(chats[case.name], case.text)
        for n in range(100):  # a flood from one user: 100 messages at once
            telegram.message(flood, f"m{n}")
        for case in cases:
            await telegram.wait_until(lambda c=case: _done(telegram, chats[c.name], c), 20)
            telegram.message(chats[case.name], AFTER)
        for case in cases:
            chat, want = chats[case.name], len(expected(case, "telegram"))
            await telegram.wait_until(lambda c=chat, n=want: _count(telegram, c, n))
            assert _shown(telegram, chat) == expected(case, "telegram"), case.name
        await telegram.wait_until(lambda: _count(telegram, flood, 100), 30)
        assert _shown(telegram, flood) == [echo(f"m{n}") for n in range(100)]
        keys = [ChannelKey("telegram", str(chat)) for chat in [*chats.values(), flood]]
        await assert_nothing_left(store, keys)
        assert_the_break_was_logged(
            caplog, ChannelKey("telegram", str(chats["the template raises"]))
        )


def _shown(telegram: FakeTelegram, chat: int) -> list[str]:
    return _joined(telegram.texts(chat, plain=True))


def _joined(messages: list[str]) -> list[str]:
    """Replies as the bot wrote them: a reply split into several messages joined again."""
    texts: list[str] = []
    for text in messages:
        if texts and not text.startswith(("read ", *_NOTICE_STARTS)):
            texts[-1] += text
        else:
            texts.append(text)
    return texts


_NOTICE_STARTS = tuple(
    getattr(N, name)[:12]
    for name in ("too_long", "unreadable", "cancel_nothing", "unknown_command", "failure")
)


def _count(telegram: FakeTelegram, chat: int, n: int) -> bool:
    return len(_shown(telegram, chat)) >= n


def _done(telegram: FakeTelegram, chat: int, case: Case) -> bool:
    return _count(telegram, chat, len(case.replies_on("telegram")))


# -- Discord ----------------------------------------------------------------------------


async def test_the_battery_through_discord(
    discord_fake: FakeDiscord, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cases = cases_for("discord")
    users = {case.name: 7000 + i for i, case in enumerate(cases)}
    dms = {name: discord_fake.dm_channel(user) for name, user in users.items()}
    flooder = 7999
    flood = discord_fake.dm_channel(flooder)

    def shown(channel: int) -> list[str]:
        return _joined([m["content"] for m in discord_fake.messages(channel)])

    async def wait_for(channel: int, n: int, within: float = 20) -> None:
        await discord_fake.wait_for(lambda: len(shown(channel)) >= n, timeout=within)

    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        discord_running(discord_fake, probe, ScriptedLLM(), store),
    ):
        for case in cases:
            await discord_fake.user_message(dms[case.name], case.text, user_id=users[case.name])
        for n in range(100):
            await discord_fake.user_message(flood, f"m{n}", user_id=flooder)
        for case in cases:
            await wait_for(dms[case.name], len(case.replies_on("discord")))
            await discord_fake.user_message(dms[case.name], AFTER, user_id=users[case.name])
        for case in cases:
            await wait_for(dms[case.name], len(expected(case, "discord")))
            assert shown(dms[case.name]) == expected(case, "discord"), case.name
        await wait_for(flood, 100, within=30)
        assert shown(flood) == [echo(f"m{n}") for n in range(100)]
        keys = [ChannelKey("discord", str(channel)) for channel in [*dms.values(), flood]]
        await assert_nothing_left(store, keys)
        assert_the_break_was_logged(caplog, ChannelKey("discord", str(dms["the template raises"])))


# -- console ----------------------------------------------------------------------------

#: inputs only a console gets: raw bytes, and lines no platform delivers
CONSOLE_ONLY = [
    (b"a\xff\xfeb", [N.unreadable, echo("a\ufffd\ufffdb")]),  # invalid UTF-8
    (b"dos line\r", [echo("dos line")]),  # a CRLF line end
    # 50 MB on one line: the console reads the first 1 MiB and skips the rest unread
    (b"y" * (50 << 20), [N.too_long.format(limit=CAP), echo("y" * CAP)]),
]


async def test_the_battery_through_the_console(tmp_path: Path) -> None:
    """One console, one channel: the cases one after the other, then one more line."""
    cases = cases_for("console")
    lines = [case.text.encode("utf-8", "surrogatepass") for case in cases]
    lines += [raw for raw, _ in CONSOLE_ONLY]
    want = [reply for case in cases for reply in case.replies_on("console")]
    want += [reply for _, replies in CONSOLE_ONLY for reply in replies]
    env = clean_env(TURBOBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    proc = await spawn_turbobot(env, "run", "tests.bad_input_bot:probe", "--platform", "console")
    out, err = await communicate(proc, b"\n".join([*lines, AFTER.encode()]) + b"\n", 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().splitlines() == [*want, echo(AFTER)]
    assert "the template broke on purpose" in err.decode()  # logged, with its channel
    assert "console:" in err.decode()


# -- platform events ------------------------------------------------------------------


async def test_telegram_events_that_are_not_messages_for_the_bot(
    telegram: FakeTelegram, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bot's own messages and other bots' are not input; updates of kinds the bot
    does not handle are skipped; repeated updates are handled once, and updates out of
    order in their chat in the order Telegram gives them; a group that removed the bot
    costs one failed send, not a retry loop, and other chats go on."""
    mine, kicked = 5100, -5200
    telegram.fail(
        "sendMessage",
        status=403,
        description="Forbidden: bot was kicked from the supergroup chat",
        times=None,
        when=lambda p: p["chat_id"] == kicked,
    )
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        telegram_running(telegram, probe, ScriptedLLM(), store) as (_adapter, runtime),
    ):
        telegram.message(mine, "from myself", user_id=telegram.bot_id, from_bot=True)
        telegram.message(mine, "from a bot", user_id=999, from_bot=True)
        telegram.push({"my_chat_member": {"chat": {"id": kicked, "type": "supergroup"}}})
        telegram.push({"poll": {"id": "1", "question": "?", "options": []}})
        first = telegram.message(mine, "one", push=False)
        second = telegram.message(mine, "two", push=False)
        telegram.push(second)
        telegram.push(first)
        telegram.push(dict(first))  # Telegram repeats an update (after a restart)
        telegram.message(kicked, "/help@turbo_test_bot")
        await telegram.wait_until(lambda: _count(telegram, mine, 2), 10)
        await runtime.join()
        telegram.message(mine, AFTER)
        await telegram.wait_until(lambda: _count(telegram, mine, 3), 10)
        await runtime.join()
        recovery = await store.recovery()
        lines = await store.transcript(ChannelKey("telegram", str(mine)))
    assert _shown(telegram, mine) == [echo("two"), echo("one"), echo(AFTER)]
    assert [line.text for line in lines if line.role == "user"] == ["two", "one", AFTER]
    kicked_sends = [c for c in telegram.calls_of("sendMessage") if c.params["chat_id"] == kicked]
    assert [c.status for c in kicked_sends] == [403]
    assert recovery.inbox == [] and recovery.unsent == []
    assert "cannot be delivered" in caplog.text
