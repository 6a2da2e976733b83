"""Token budgets per user per day, ``/usage``, who may ``/reset`` a shared conversation,
and the guild allowlist (turbobot.limits, in the core for every adapter)."""

from __future__ import annotations

from typing import Any

import pytest

from turbobot import Generate, GetUserInput, Result, System, User, turbo
from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.limits import Limits, TokenBudget, duration
from turbobot.llm.base import LLMRequest, LLMResponse
from turbobot.llm.scripted import ScriptedLLM
from turbobot.messages import Usage
from turbobot.runtime import Notices, RuntimeSettings
from turbobot.store import BaseStore, StepWrite, TokenUsage, utc_day
from turbobot.testing import BotSession, FakeClock

from .conftest import StoreFactory

DAY = 86_400.0
#: 2027-01-15 00:00 UTC: the clock starts a day at midnight
MIDNIGHT = 1_800_000_000.0 - 1_800_000_000.0 % DAY


def lucky_number() -> int:
    """The lucky number."""
    return 7


@turbo()
async def chatty():
    """A bot that asks the model, with a tool and a hidden thought, for each message."""
    yield System(content="Be brief.")
    while True:
        said = yield GetUserInput(timeout=60)
        if said.timed_out:
            yield User(content="(the user is quiet)")
            yield Generate()
            continue
        yield User(content=said)
        yield Generate(forward=False)  # a thought the user never sees: still counted
        yield Generate(tools=[lucky_number])


@turbo()
async def thrifty():
    """A bot that asks the model, with a tool and a hidden thought, for each message."""
    while True:
        said = yield GetUserInput()
        yield User(content=said)
        yield Generate(forward=False)
        yield Generate(tools=[lucky_number])


def priced(prompt: int, completion: int) -> ScriptedLLM:
    """Answers every request, with a tool call for requests that offer a tool."""

    def respond(request: LLMRequest) -> LLMResponse:
        if request.tools and request.messages[-1]["role"] != "tool":
            call = ScriptedLLM.tool_call("lucky_number", "{}")
            return LLMResponse("", call.tool_calls, Usage(prompt, completion), "tool_calls")
        return LLMResponse("ok", (), Usage(prompt, completion), "stop")

    return ScriptedLLM(respond=respond)


def settings(**limits: Any) -> RuntimeSettings:
    return RuntimeSettings(limits=Limits(**limits))


def over_budget(limit: int, renews: str) -> str:
    return Notices().over_budget.format(limit=limit, renews=renews)


async def test_each_model_call_is_counted_for_its_user_and_day() -> None:
    """Thought, tool round and answer: 3 calls of 10 + 5 tokens per message."""
    clock = FakeClock(MIDNIGHT + 3600)
    async with BotSession(chatty, llm=priced(10, 5), clock=clock) as bot:
        assert await bot.say("hi", author="ann") == ["ok"]
        assert await bot.say("hi", author="bob", channel="b") == ["ok"]
        assert await bot.say("again", author="ann") == ["ok"]
        today = utc_day(clock())
        assert await bot.store.usage("test", "ann", today) == [
            TokenUsage("test", "ann", today, 60, 30, 6)
        ]
        assert await bot.store.usage("test", "bob", today) == [
            TokenUsage("test", "bob", today, 30, 15, 3)
        ]
        # a deadline's generation is the conversation starter's
        assert await bot.advance(60, channel="chat") == ["ok"]
        (ann,) = await bot.store.usage("test", "ann", today)
        assert (ann.tokens, ann.generations) == (105, 7)
        reply = await bot.say("/usage", author="ann")
        assert reply == [
            Notices().usage.format(today=105, prompt=70, completion=35, calls=7, week=105)
        ]


async def test_a_user_over_the_budget_is_told_and_others_go_on_until_midnight() -> None:
    clock = FakeClock(MIDNIGHT + 20 * 3600)  # 20:00 UTC
    limits = settings(tokens_per_day=100)
    async with BotSession(thrifty, llm=priced(10, 5), settings=limits, clock=clock) as bot:
        assert await bot.say("one", author="ann") == ["ok"]  # 45 tokens
        assert await bot.say("two", author="ann") == ["ok"]  # 90: under, answered
        assert await bot.say("three", author="ann") == ["ok"]  # 135: crossed, finished
        for text in ("four", "/retry", "/start"):
            assert await bot.say(text, author="ann") == [over_budget(100, "4 h 0 min")]
        # what does not generate still works, and says where the user stands
        (usage,) = await bot.say("/usage", author="ann")
        assert usage.endswith(Notices().usage_budget.format(limit=100, left=0, renews="4 h 0 min"))
        assert "135 tokens" in usage
        assert (await bot.say("/help", author="ann"))[0].startswith("A bot that asks")
        # another user in another chat is not held back
        assert await bot.say("hi", author="bob", channel="b") == ["ok"]
        calls = bot.llm.calls  # type: ignore[attr-defined]
        clock.advance(4 * 3600 - 1)  # 23:59:59
        assert await bot.say("five", author="ann") == [over_budget(100, "under a minute")]
        assert bot.llm.calls == calls  # type: ignore[attr-defined]
        clock.advance(1)  # a new day
        assert await bot.say("six", author="ann") == ["ok"]
        users = [text for role, text in await bot.transcript() if role == "user"]
        # refused messages were read (and answered), not given to the template
        assert users == ["one", "two", "three", "six"]


async def test_the_budget_holds_across_a_restart(make_store: StoreFactory) -> None:
    clock = FakeClock(MIDNIGHT + 3600)
    store = await make_store()
    limits = settings(tokens_per_day=50)
    session = BotSession(chatty, llm=priced(10, 5), store=store, settings=limits, clock=clock)
    async with session as bot:
        assert await bot.say("one", author="ann") == ["ok"]
        assert await bot.say("two", author="ann") == ["ok"]
        await bot.restart()
        assert await bot.say("three", author="ann") == [over_budget(50, "23 h 0 min")]


@pytest.mark.parametrize("store_url", ["memory", "sqlite", "postgres"], indirect=True)
async def test_the_store_adds_usage_up_per_user_and_day(make_store: StoreFactory) -> None:
    store: BaseStore = await make_store()
    days = ["2027-01-14", "2027-01-15"]

    def used(user: str, day: str, prompt: int, completion: int) -> TokenUsage:
        return TokenUsage("telegram", user, day, prompt, completion, 1)

    # several in one step, and steps committed together (one batch)
    await store.write(StepWrite(usage=[used("1", days[0], 3, 4), used("1", days[0], 1, 1)]))
    await store.write(StepWrite(usage=[used("1", days[1], 5, 6)]))
    await store.write(StepWrite(usage=[used("1", days[1], 2**40, 1), used("2", days[1], 1, 1)]))
    await store.flush()
    assert await store.usage("telegram", "1", days[0]) == [
        TokenUsage("telegram", "1", days[0], 4, 5, 2),
        TokenUsage("telegram", "1", days[1], 5 + 2**40, 7, 2),
    ]
    assert await store.usage("telegram", "1", days[1]) == [
        TokenUsage("telegram", "1", days[1], 5 + 2**40, 7, 2)
    ]
    assert await store.usage("discord", "1", days[0]) == []
    hostile = TokenUsage("telegram", "\x00\ud800'; DROP TABLE usage; --", days[1], 1, 1, 1)
    await store.write(StepWrite(usage=[hostile]))
    assert len(await store.usage("telegram", "2", days[0])) == 1


async def test_the_budget_reads_a_user_once_a_day_then_counts() -> None:
    reads: list[tuple[str, str, str]] = []
    now = [MIDNIGHT + 10.0]

    async def read(platform: str, user: str, since: str) -> list[TokenUsage]:
        reads.append((platform, user, since))
        return [TokenUsage(platform, user, since, 30, 10, 1)]

    budget = TokenBudget(100, read, lambda: now[0])
    assert await budget.spent("telegram", "1") == 40
    budget.spend(TokenUsage("telegram", "1", utc_day(now[0]), 50, 10, 1))
    assert await budget.spent("telegram", "1") == 100
    assert await budget.exhausted("telegram", "1")
    assert len(reads) == 1
    now[0] += DAY
    budget.spend(TokenUsage("telegram", "1", utc_day(now[0] - DAY), 50, 10, 1))  # late
    assert await budget.spent("telegram", "1") == 40  # read again: a new day
    assert len(reads) == 2
    assert duration(budget.renews_in()) == "23 h 59 min"


def test_budget_and_guild_settings_refuse_nonsense() -> None:
    from turbobot.cli import runtime_settings
    from turbobot.exceptions import ConfigurationError

    limits = runtime_settings(
        {
            "TURBOBOT_USER_TOKENS_PER_DAY": "50_000",
            "TURBOBOT_ALLOWED_GUILDS": "1, 2",
            "TURBOBOT_ADMINS": "telegram:9",
        }
    ).limits
    assert limits.tokens_per_day == 50_000
    assert limits.guilds == frozenset({"1", "2"})
    assert limits.is_admin("telegram", "9") and not limits.is_admin("discord", "9")
    assert not limits.is_admin("telegram", "")
    for bad in ("0", "-5", "lots", "1.5"):
        with pytest.raises(ConfigurationError, match=f"TURBOBOT_USER_TOKENS_PER_DAY .* '{bad}'"):
            runtime_settings({"TURBOBOT_USER_TOKENS_PER_DAY": bad})
    with pytest.raises(ValueError, match="tokens_per_day"):
        Limits(tokens_per_day=0)


# -- who may /reset a shared conversation ------------------------------------------------


@turbo()
async def group_echo():
    while True:
        said = yield GetUserInput()
        yield Result(f"noted {said}")


class AdminSession(BotSession):
    """The chat's admins as a platform would say (``BaseSender.is_admin``)."""

    def __init__(self, *args: Any, admins: set[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[ChannelKey, str]] = []

        async def is_admin(key: ChannelKey, user_id: str) -> bool:
            self.asked.append((key, user_id))
            if user_id == "broken":
                raise RuntimeError("the platform is down")
            return user_id in admins

        self.sender.is_admin = is_admin  # type: ignore[method-assign]


async def test_in_a_shared_chat_only_the_starter_or_an_admin_may_reset() -> None:
    limits = settings(admins=frozenset({"test:op"}))
    async with AdminSession(group_echo, settings=limits, admins={"mod"}) as bot:
        assert await bot.say("plan", author="ann", channel="g") == ["noted plan"]
        assert await bot.say("more", author="bob", channel="g") == ["noted more"]
        refused = [Notices().not_yours]
        assert await bot.say("/reset", author="bob", channel="g") == refused
        assert await bot.say("/reset", author="broken", channel="g") == refused
        # nor under another name: what ends or rewrites the conversation is the same
        for other in ("/new", "/start", "/retry"):
            assert await bot.say(other, author="bob", channel="g") == refused
        assert bot.runtime.has_conversation(bot.key("g"))
        assert await bot.say("still", author="bob", channel="g") == ["noted still"]
        for resetter in ("ann", "mod", "op"):
            assert await bot.say("/reset", author=resetter, channel="g") == [Notices().reset]
            assert not bot.runtime.has_conversation(bot.key("g"))
            await bot.say(f"by {resetter}", author="bob", channel="g")  # bob starts anew
        # the starter is asked about only when it is not the requester
        assert [user for _, user in bot.asked] == ["bob", "broken", "bob", "bob", "bob", "mod"]
        # nothing going: anyone may reset (nothing is lost)
        assert await bot.say("/reset", author="zed", channel="empty") == [Notices().reset]


async def test_the_starter_of_an_evicted_conversation_is_known_from_the_store() -> None:
    async with AdminSession(group_echo, admins=set()) as bot:
        await bot.say("plan", author="ann", channel="g")
        assert await bot.runtime.evict(bot.key("g"))
        assert await bot.say("/reset", author="bob", channel="g") == [Notices().not_yours]
        await bot.restart()
        assert await bot.say("/reset", author="bob", channel="g") == [Notices().not_yours]
        assert await bot.say("/reset", author="ann", channel="g") == [Notices().reset]


# -- the guild allowlist -----------------------------------------------------------------


async def test_the_guild_allowlist_leaves_direct_messages_to_the_user_list() -> None:
    limits = settings(guilds=frozenset({"discord:1"}))
    async with BotSession(group_echo, settings=limits, platform="discord") as bot:

        def sent_in(guild: str | None, channel: str) -> IncomingMessage:
            message = bot.message("hi", channel=channel, author="u" + channel)
            return IncomingMessage(
                message.key, "hi", message.message_id, author_id=message.author_id, guild=guild
            )

        for guild, channel in (("1", "ok"), ("2", "other"), (None, "dm")):
            await bot.runtime.receive(sent_in(guild, channel))
        await bot.settle()
        assert bot.texts("ok") == ["noted hi"]
        assert bot.texts("other") == [Notices().not_allowed]
        assert bot.texts("dm") == ["noted hi"]
        assert await bot.store.inbox(bot.key("other")) == []
        stored = (await bot.store.transcript(bot.key("ok")))[0]
        assert stored.text == "hi"


@turbo()
async def other_echo():
    while True:
        said = yield GetUserInput()
        yield Result(f"other {said}")


async def test_mode_switching_a_shared_conversation_is_the_starters_too() -> None:
    async with AdminSession(group_echo, admins=set(), modes=[other_echo]) as bot:
        assert await bot.say("plan", author="ann", channel="g") == ["noted plan"]
        assert await bot.say("/mode other_echo", author="bob", channel="g") == [Notices().not_yours]
        assert await bot.say("more", author="bob", channel="g") == ["noted more"]
        switched = Notices().mode_switched.format(mode="other_echo")
        assert await bot.say("/mode other_echo", author="ann", channel="g") == [switched]


@pytest.mark.parametrize("store_url", ["memory", "sqlite", "postgres"], indirect=True)
async def test_hostile_user_ids_are_counted_and_block_no_one(make_store: StoreFactory) -> None:
    """Ids no column takes as they are (NUL, a lone surrogate, 200 characters): their
    usage is stored and read back, their budget applies, and no step is lost."""
    clock = FakeClock(MIDNIGHT + 3600)
    store = await make_store()
    limits = settings(tokens_per_day=50)
    hostile = ["a\x00b", "x\ud800", "u" * 200, "u" * 199 + "v"]
    session = BotSession(thrifty, llm=priced(10, 5), store=store, settings=limits, clock=clock)
    async with session as bot:
        for n, user in enumerate(hostile):
            assert await bot.say("hi", author=user, channel=f"h{n}") == ["ok"]
            assert await bot.say("/usage", author=user, channel=f"h{n}") == [
                Notices().usage.format(today=45, prompt=30, completion=15, calls=3, week=45)
                + "\n"
                + Notices().usage_budget.format(limit=50, left=5, renews="23 h 0 min")
            ]
        await bot.restart()  # read from the store again
        for n, user in enumerate(hostile):
            assert await bot.say("again", author=user, channel=f"h{n}") == ["ok"]  # 45 < 50
            assert await bot.say("more", author=user, channel=f"h{n}") == [
                over_budget(50, "23 h 0 min")
            ]
            lines = await bot.transcript(f"h{n}")
            assert lines == [
                ("user", "hi"),
                ("assistant", "ok"),
                ("user", "again"),
                ("assistant", "ok"),
            ]
        assert await bot.say("hi", author="ann", channel="plain") == ["ok"]
