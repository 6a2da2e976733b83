"""Abuse limits in the core (turbobot.limits): allowlists and a per-user rate."""

from __future__ import annotations

import pytest

from turbobot import GetUserInput, Result, turbo
from turbobot.limits import Limits, RateLimiter, parse_ids
from turbobot.runtime import Notices, RuntimeSettings
from turbobot.testing import BotSession, FakeClock


@turbo()
async def echo():
    while True:
        said = yield GetUserInput()
        yield Result(f"you said {said}")


def settings(**limits: object) -> RuntimeSettings:
    return RuntimeSettings(limits=Limits(**limits))  # type: ignore[arg-type]


async def test_a_user_off_the_allowlist_is_told_once_and_nothing_is_stored() -> None:
    limits = settings(users=parse_ids("alice, telegram:bob"))
    async with BotSession(echo, settings=limits, platform="telegram") as bot:
        assert await bot.say("hi", author="alice") == ["you said hi"]
        assert await bot.say("hello", author="bob", channel="b") == ["you said hello"]
        for text in ("let me in", "please", "/start"):
            await bot.send(text, author="mallory", channel="m")
        await bot.settle()
        assert bot.texts("m") == [Notices().not_allowed]  # once, whatever they send
        assert await bot.store.transcript(bot.key("m")) == []
        assert await bot.store.inbox(bot.key("m")) == []


async def test_an_allowlisted_id_for_another_platform_does_not_match() -> None:
    limits = settings(users=parse_ids("discord:alice"))
    async with BotSession(echo, settings=limits, platform="telegram") as bot:
        await bot.say("hi", author="alice")
        assert bot.texts() == [Notices().not_allowed]


async def test_a_chat_allowlist() -> None:
    async with BotSession(echo, settings=settings(chats=frozenset({"team"}))) as bot:
        assert await bot.say("hi", channel="team") == ["you said hi"]
        await bot.say("hi", channel="elsewhere")
        assert bot.texts("elsewhere") == [Notices().not_allowed]


async def test_a_flood_waits_its_turn_in_order_and_nothing_is_lost() -> None:
    """3 messages a minute, 2 at once: 6 sent at once are all answered, in order, two
    now and one every 20 s; the user is told once; another user is not slowed."""
    clock = FakeClock()
    async with BotSession(echo, settings=settings(per_minute=3, burst=2), clock=clock) as bot:
        for n in range(1, 7):
            await bot.send(f"m{n}")
        await bot.settle()
        shown = bot.texts("chat")
        assert shown[:2] == ["you said m1", "you said m2"]
        assert len(shown) == 3 and shown[2].startswith("You are sending messages faster")
        assert "20 s" in shown[2]
        assert await bot.say("hello", channel="other", author="someone") == ["you said hello"]
        for n in range(3, 7):
            assert await bot.advance(20, channel="chat") == [f"you said m{n}"]
        assert await bot.advance(600, channel="chat") == []
        # rested: a burst is allowed again, without a notice
        assert await bot.say("again") == ["you said again"]
        users = [text for role, text in await bot.transcript("chat") if role == "user"]
        assert users == [*(f"m{n}" for n in range(1, 7)), "again"]


def test_the_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    user = ("telegram", "1")
    assert limiter.take(user) == 0 and limiter.take(user) == 0
    assert limiter.take(user) == pytest.approx(1.0)
    now[0] += 0.5
    assert limiter.take(user) == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.take(user) == 0
    now[0] += 10
    limiter.prune()
    assert limiter._buckets == {}  # a rested user costs nothing


@pytest.mark.parametrize("bad", [{"per_minute": 0}, {"per_minute": -1}, {"burst": 0}])
def test_limits_refuse_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Limits(**bad)  # type: ignore[arg-type]


def test_the_command_reads_the_limits_from_its_environment() -> None:
    from turbobot.cli import runtime_settings
    from turbobot.exceptions import ConfigurationError

    limits = runtime_settings(
        {
            "TURBOBOT_ALLOWED_USERS": "12, telegram:34",
            "TURBOBOT_ALLOWED_CHATS": "-100",
            "TURBOBOT_USER_RATE": "20",
            "TURBOBOT_USER_BURST": "5",
        }
    ).limits
    assert limits == Limits(frozenset({"12", "telegram:34"}), frozenset({"-100"}), 20.0, 5)
    assert runtime_settings({}).limits == Limits()
    for name, bad in [
        ("TURBOBOT_USER_RATE", "fast"),
        ("TURBOBOT_USER_RATE", "0"),
        ("TURBOBOT_USER_BURST", "0"),
        ("TURBOBOT_USER_BURST", "2.5"),
    ]:
        with pytest.raises(ConfigurationError, match=f"{name} .* got '{bad}'"):
            runtime_settings({name: bad})


async def test_the_notice_to_a_refused_user_goes_out_even_if_the_bot_stops_at_once() -> None:
    session = BotSession(echo, settings=settings(users=frozenset({"alice"})))
    async with session as bot:
        await bot.send("hi", author="mallory")  # (no settle: the bot stops right away)
    assert session.sender.texts() == [Notices().not_allowed]
