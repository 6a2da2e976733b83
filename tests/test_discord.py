"""The Discord adapter end to end: real discord.py against the fake Discord server.

Every test runs the adapter's gateway connection against a fake Discord REST API and
gateway on 127.0.0.1 and, where a reply is generated, the real openai client against
the fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fakes.discord_server import OWNER_ID, FakeDiscord
from fakes.openai_server import FakeOpenAI, Reply
from tests.test_telegram import chat, streamer
from turbobot import ChannelKey
from turbobot.adapters.console import ConsoleAdapter
from turbobot.adapters.discord import MESSAGE_LIMIT, DiscordAdapter, DiscordSettings, _nonce, _parts
from turbobot.bots.horoscope import horoscope
from turbobot.commands import Command, CommandCall
from turbobot.delivery import delivering
from turbobot.limits import Limits
from turbobot.llm.openai import OpenAILLM
from turbobot.runtime import Notices, Runtime, RuntimeSettings
from turbobot.sql import SQLStore
from turbobot.store import BaseStore, InMemoryStore
from turbobot.template import INTERRUPTED, Template

WELCOME = "Welcome, traveller. What is your zodiac sign?"
ALICE = 501
BOB = 502
#: an image without text, as Discord describes an attachment
PHOTO = {
    "id": "9",
    "filename": "cat.png",
    "size": 10,
    "url": "http://x/cat.png",
    "proxy_url": "http://x/cat.png",
    "content_type": "image/png",
}


@contextlib.asynccontextmanager
async def running(
    fake: FakeDiscord,
    template: Template,
    llm: Any,
    store: BaseStore | None = None,
    *,
    stop_grace: float = 10.0,
    limits: Limits | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[DiscordAdapter, Runtime]]:
    """The adapter connected to the fake gateway with a runtime behind it; stopped after."""
    options: dict[str, Any] = {"stream_interval": 0.2, "ready_timeout": 0.05, **overrides}
    settings = DiscordSettings(
        token=fake.token, api_base_url=fake.api_url, gateway_url=fake.gateway_url, **options
    )
    store = store or InMemoryStore()
    async with DiscordAdapter(settings) as adapter:
        runtime_settings = RuntimeSettings(
            bot_username=adapter.username,
            typing_delay=0.2,
            stop_grace=stop_grace,
            limits=limits or Limits(),
        )
        async with Runtime(
            template, llm=llm, sender=adapter, store=store, settings=runtime_settings
        ) as runtime:
            task = asyncio.create_task(adapter.run(runtime, handle_signals=False))
            try:
                await asyncio.wait_for(adapter.wait_until_ready(), 10)
                yield adapter, runtime
            finally:
                adapter.stop()
                await asyncio.wait_for(task, 10)


def no_pings(message: dict[str, Any]) -> bool:
    """The message was sent with nothing allowed to ping (nor the replied-to user)."""
    allowed = message["allowed_mentions"]
    return (
        allowed["parse"] == []
        and not allowed.get("replied_user")
        and not (allowed.keys() & {"users", "roles"})
    )


async def texts(fake: FakeDiscord, channel: int, count: int) -> list[str]:
    """Wait until the bot shows ``count`` messages in the channel; their texts."""
    await fake.wait_for(lambda: len(fake.messages(channel)) >= count, timeout=10)
    return [m["content"] for m in fake.messages(channel)]


async def test_a_dm_conversation_of_several_turns_matches_the_transcript(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    dm = discord_fake.dm_channel(ALICE)
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(discord_fake, horoscope, openai_llm, store) as (adapter, _runtime),
    ):
        assert adapter.username == discord_fake.bot_name
        await discord_fake.wait_for(lambda: bool(discord_fake.commands))
        assert [c["name"] for c in discord_fake.commands] == [
            "start",
            "reset",
            "retry",
            "cancel",
            "usage",
            "help",
        ]
        await discord_fake.user_message(dm, "hi", user_id=ALICE)
        assert await texts(discord_fake, dm, 1) == [WELCOME]
        await discord_fake.user_message(dm, "I am a leo", user_id=ALICE)
        await discord_fake.user_message(dm, "will I be rich?", user_id=ALICE)  # type-ahead
        shown = await texts(discord_fake, dm, 3)
        lines = await store.transcript(ChannelKey("discord", str(dm)))
    assert shown == [WELCOME, "Ah, Leo. What do you want to know?", "echo: will I be rich?"]
    assert [(line.role, line.text) for line in lines] == [
        ("user", "hi"),
        ("assistant", WELCOME),
        ("user", "I am a leo"),
        ("assistant", "Ah, Leo. What do you want to know?"),
        ("user", "will I be rich?"),
        ("assistant", "echo: will I be rich?"),
    ]
    assert len(openai_server.requests) == 1
    # nobody can be pinged by a reply
    assert all(no_pings(m) for m in discord_fake.sent)


async def test_server_channels_answer_mentions_replies_and_commands_per_member(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    guild = discord_fake.add_guild(channels=("general",))
    general = guild.channels["general"]
    async with running(discord_fake, horoscope, openai_llm):
        await discord_fake.user_message(general, "hello everyone", user_id=ALICE)
        await discord_fake.user_message(general, "hi there", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, general, 1) == [WELCOME]
        first = discord_fake.messages(general)[0]
        # the reply answers the user's message, without pinging them
        assert str(first["message_reference"]["message_id"]) == discord_fake.user_messages[-1]["id"]
        # another member has a conversation of their own (the sign wakes it directly)
        await discord_fake.user_message(general, "I am a Pisces", user_id=BOB, mention_bot=True)
        assert (await texts(discord_fake, general, 2))[1] == "Ah, Pisces. What do you want to know?"
        # a reply to the bot's message continues the conversation it belongs to (Alice's),
        # although Bob sends it, and needs no mention
        await discord_fake.user_message(general, "I am a Leo", user_id=BOB, reply_to=first["id"])
        assert (await texts(discord_fake, general, 3))[2] == "Ah, Leo. What do you want to know?"
        # a text command addresses the bot too: Bob's conversation starts again
        await discord_fake.user_message(general, "/start", user_id=BOB)
        assert (await texts(discord_fake, general, 4))[3] == WELCOME


async def test_respond_always_and_a_trigger(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    guild = discord_fake.add_guild(channels=("general", "quiet"))
    general, quiet = guild.channels["general"], guild.channels["quiet"]
    async with running(discord_fake, chat, openai_llm, respond="always"):
        await discord_fake.user_message(general, "no mention needed", user_id=ALICE)
        assert await texts(discord_fake, general, 1) == ["echo: no mention needed"]
    async with running(discord_fake, chat, openai_llm, trigger="!ask"):
        await discord_fake.user_message(quiet, "just chatting", user_id=ALICE)
        await discord_fake.user_message(quiet, "!asking around", user_id=ALICE)  # not the word
        await discord_fake.user_message(quiet, "!ask what time is it", user_id=ALICE)
        assert await texts(discord_fake, quiet, 1) == ["echo: what time is it"]
    assert len(openai_server.requests) == 2


async def test_shared_mode_prefixes_the_speaker(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    async with running(discord_fake, chat, openai_llm, group_mode="shared"):
        await discord_fake.user_message(
            general, "hello", user_id=ALICE, username="Ann", mention_bot=True
        )
        assert await texts(discord_fake, general, 1) == ["echo: Ann: hello"]
        await discord_fake.user_message(
            general, "hi", user_id=BOB, username="Bob", mention_bot=True
        )
        assert (await texts(discord_fake, general, 2))[1] == "echo: Bob: hi"
    users = [m["content"] for m in openai_server.requests[1]["messages"] if m["role"] == "user"]
    assert users == ["Ann: hello", "Bob: hi"]


async def test_a_shared_conversation_is_reset_by_its_starter_or_a_server_admin(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    reset, refused = Notices().reset, Notices().not_yours
    async with running(discord_fake, chat, openai_llm, group_mode="shared"):
        say = discord_fake.user_message
        await say(general, "hello", user_id=ALICE, username="Ann", mention_bot=True)
        await say(general, "/reset", user_id=BOB, username="Bob")
        assert await texts(discord_fake, general, 2) == ["echo: Ann: hello", refused]
        # the server's owner has the Administrator permission; the starter may too
        for resetter in (OWNER_ID, ALICE):
            await say(general, "again", user_id=ALICE, username="Ann", mention_bot=True)
            await say(general, "/reset", user_id=resetter, username="Mod")
        shown = await texts(discord_fake, general, 6)
    assert shown[2:] == ["echo: Ann: again", reset] * 2


async def test_a_reply_sent_again_is_shown_once(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    """Sent again under the same outbox id (a retry, a restart), a reply carries the
    same nonces, which Discord enforces: it gives back the message it has, which is
    made to read the whole reply (it may have been a stream's preview)."""
    dm = discord_fake.dm_channel(ALICE)
    key = ChannelKey("discord", str(dm))
    async with running(discord_fake, chat, openai_llm) as (adapter, _runtime):
        token = delivering.set("reply-1")
        try:
            first = await adapter.send(key, "hello")
            again = await adapter.send(key, "hello")
            # a preview was shown, the process died, the whole reply is sent again
            delivering.set("reply-2")
            await adapter._post(key, "the begin…", first=False)
            long = "the beginning and the end " + "x" * 2100
            whole = await adapter.send(key, long)
        finally:
            delivering.reset(token)
        other = await adapter.send(key, "hello")  # no id: a new message
    assert first == again
    shown = [m["content"] for m in discord_fake.messages(dm)]
    assert shown == ["hello", *_parts(long), "hello"]  # the preview became the first part
    assert whole is not None and other != first
    # created: "hello", the preview (the reply's first part), its other parts, "hello"
    nonces = [m.get("nonce") for m in discord_fake.sent]
    expected = [_nonce("reply-1", 0), *(_nonce("reply-2", i) for i in range(len(_parts(long))))]
    assert nonces[:-1] == expected


async def test_the_guild_allowlist_answers_only_in_listed_servers(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    listed, other = discord_fake.add_guild("listed"), discord_fake.add_guild("other")
    dm = discord_fake.dm_channel(ALICE)
    limits = Limits(guilds=frozenset({f"discord:{listed.id}"}))
    async with running(discord_fake, chat, openai_llm, limits=limits) as (_adapter, runtime):
        for channel in (listed.channels["general"], other.channels["general"]):
            await discord_fake.user_message(channel, "hi", user_id=ALICE, mention_bot=True)
        await discord_fake.user_message(dm, "hi", user_id=ALICE)
        assert await texts(discord_fake, listed.channels["general"], 1) == ["echo: hi"]
        assert await texts(discord_fake, dm, 1) == ["echo: hi"]  # DMs: the users list
        assert await texts(discord_fake, other.channels["general"], 1) == [Notices().not_allowed]
        unlisted = ChannelKey("discord", str(other.channels["general"]), None, str(ALICE))
        assert await runtime.store.transcript(unlisted) == []


async def test_threads_are_channels_of_their_own_and_can_be_opened_per_conversation(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    thread = discord_fake.add_thread(guild, general, "side talk")
    async with running(discord_fake, horoscope, openai_llm):
        await discord_fake.user_message(thread, "hi", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, thread, 1) == [WELCOME]
        await discord_fake.user_message(general, "hi", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, general, 1) == [WELCOME]  # not the thread's
    async with running(discord_fake, chat, openai_llm, threads=True):
        await discord_fake.user_message(general, "open a thread", user_id=BOB, mention_bot=True)
        await discord_fake.wait_for(lambda: bool(discord_fake.threads_created))
        opened = int(discord_fake.threads_created[0]["id"])
        assert await texts(discord_fake, opened, 1) == ["echo: open a thread"]
        # in the bot's own thread everything is for the bot, with no mention
        await discord_fake.user_message(opened, "and more", user_id=BOB)
        assert (await texts(discord_fake, opened, 2))[1] == "echo: and more"


async def test_a_5000_character_reply_is_split_with_its_code_block_intact(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    code = "\n".join(f"value_{i} = {i} * 2  # fine" for i in range(120))
    prose = " ".join(f"word{i}" for i in range(300))
    long_reply = f"{prose}\n\n```python\n{code}\n```\n\n{prose} @everyone <@&42> <@{BOB}>"
    assert len(long_reply) > 5000
    openai_server.script(long_reply)
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, chat, openai_llm):
        await discord_fake.user_message(dm, "write a lot", user_id=ALICE)
        await discord_fake.wait_for(lambda: len(discord_fake.messages(dm)) >= 3)
        await asyncio.sleep(0.3)  # nothing more comes
        parts = [m["content"] for m in discord_fake.messages(dm)]
    assert all(0 < len(p) <= MESSAGE_LIMIT for p in parts)
    # every part that holds code opens and closes its fence: the block renders as code
    for part in parts:
        assert part.count("```") % 2 == 0
        for line in part.splitlines():
            if line.startswith("value_"):
                before = part[: part.index(line)]
                assert before.count("```") % 2 == 1  # inside an open fence
    assert "".join(re.sub(r"```(python)?|\s", "", p) for p in parts) == re.sub(
        r"```(python)?|\s", "", long_reply
    )
    # the mass mention is text; nothing may ping
    assert "@everyone" in parts[-1]
    assert all(no_pings(m) for m in discord_fake.sent)


async def test_streaming_edits_converge_to_the_final_text_under_429s(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    final = " ".join(f"word{i}" for i in range(400))  # over 2,000 characters: rolls over
    openai_server.script(Reply(content=final, chunk_delay=0.005))
    dm = discord_fake.dm_channel(ALICE)
    discord_fake.fail("PATCH", rf"/channels/{dm}/messages/\d+", status=429, times=2)
    async with running(discord_fake, streamer, openai_llm, stream_interval=0.25):
        await discord_fake.user_message(dm, "stream it", user_id=ALICE)
        await discord_fake.wait_for(
            lambda: " ".join(m["content"] for m in discord_fake.messages(dm)) == final,
            timeout=20,
        )
    shown = discord_fake.messages(dm)
    assert len(shown) == 2 and all(len(m["content"]) <= MESSAGE_LIMIT for m in shown)
    assert len(discord_fake.edits) >= 2  # it grew before it was complete
    statuses = [s for (method, _path, s) in discord_fake.statuses if method == "PATCH"]
    assert 429 in statuses
    # paced: no more than one edit per interval in the channel (plus the final one)
    times = [e.at for e in discord_fake.edits]
    spans = [b - a for a, b in itertools.pairwise(times)]
    assert sum(1 for s in spans if s < 0.2) <= 2


async def test_a_slash_command_answers_in_the_interaction(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    async with running(discord_fake, chat, openai_llm):
        await discord_fake.user_message(general, "one", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, general, 1) == ["echo: one"]
        interaction = await discord_fake.slash_command("reset", general, user_id=ALICE)
        await discord_fake.wait_for(lambda: bool(interaction.followups))
        await discord_fake.user_message(general, "two", user_id=ALICE, mention_bot=True)
        # (the fake keeps the follow-up that answered the command on its interaction)
        assert await texts(discord_fake, general, 2) == ["echo: one", "echo: two"]
    assert interaction.callbacks[0]["type"] == 5  # "thinking…" within Discord's 3 s
    assert interaction.followups[0]["content"].startswith("Conversation reset.")
    # the conversation after the reset starts afresh
    users = [m["content"] for m in openai_server.requests[-1]["messages"] if m["role"] == "user"]
    assert users == ["two"]


async def test_a_duplicate_message_after_a_resume_is_handled_once(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, chat, openai_llm):
        await discord_fake.user_message(dm, "only once", user_id=ALICE)
        assert await texts(discord_fake, dm, 1) == ["echo: only once"]
        await discord_fake.force_reconnect(resume=True)
        await discord_fake.wait_for(lambda: discord_fake.resumes >= 1)
        await discord_fake.redeliver_last()
        await discord_fake.user_message(dm, "next", user_id=ALICE)
        assert await texts(discord_fake, dm, 2) == ["echo: only once", "echo: next"]
        # a full re-IDENTIFY loses nothing either
        await discord_fake.force_reconnect(resume=False)
        await discord_fake.wait_for(lambda: len(discord_fake.identifies) >= 2)
        await discord_fake.user_message(dm, "after", user_id=ALICE)
        assert (await texts(discord_fake, dm, 3))[2] == "echo: after"
    assert len(openai_server.requests) == 3


async def test_attachments_stickers_edits_bots_webhooks_and_system_messages(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    dm = discord_fake.dm_channel(ALICE)
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(discord_fake, chat, openai_llm, store),
    ):
        await discord_fake.user_message(dm, "", user_id=ALICE, attachments=[PHOTO])
        notice = await texts(discord_fake, dm, 1)
        assert notice == ["I can only read text messages, sorry: please type your message."]
        edited = await discord_fake.user_message(dm, "first", user_id=ALICE)
        assert (await texts(discord_fake, dm, 2))[1] == "echo: first"
        await discord_fake.user_edit(int(edited["id"]), "first, edited")
        await discord_fake.user_delete(int(edited["id"]))
        await discord_fake.user_message(dm, "beep", user_id=777, bot=True)
        await discord_fake.user_message(dm, "hook", user_id=778, webhook_id=5)
        await discord_fake.user_message(dm, "", user_id=ALICE, type=7)  # member joined
        await discord_fake.user_message(
            dm, "", user_id=ALICE, sticker_items=[{"id": "1", "name": "wave", "format_type": 1}]
        )
        assert (await texts(discord_fake, dm, 3))[2] == notice[0]
        await discord_fake.user_message(dm, "last", user_id=ALICE)
        assert (await texts(discord_fake, dm, 4))[3] == "echo: last"
        lines = await store.transcript(ChannelKey("discord", str(dm)))
    users = [line.text for line in lines if line.role == "user"]
    # media without text are answered, not put in the conversation; edits, bots,
    # webhooks and system messages are not input
    assert users == ["first", "last"]
    assert len(openai_server.requests) == 2


async def test_a_channel_the_bot_may_not_post_in_is_not_retried_for_ever(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, tmp_path: Path, caplog: Any
) -> None:
    guild = discord_fake.add_guild(channels=("general", "readonly"))
    readonly, general = guild.channels["readonly"], guild.channels["general"]
    discord_fake.forbid(readonly)
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(discord_fake, chat, openai_llm, store) as (_adapter, runtime),
    ):
        await discord_fake.user_message(readonly, "hello?", user_id=ALICE, mention_bot=True)
        await discord_fake.wait_for(
            lambda: any(p == f"/channels/{readonly}/messages" for _m, p in discord_fake.requests)
        )
        await runtime.join()
        # other channels go on
        await discord_fake.user_message(general, "hello", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, general, 1) == ["echo: hello"]
        await runtime.join()
        recovery = await store.recovery()
    assert recovery.unsent == []
    assert "cannot be delivered" in caplog.text
    posts = [
        p for m, p in discord_fake.requests if m == "POST" and p.endswith(f"{readonly}/messages")
    ]
    assert len(posts) == 1


async def test_a_broken_off_stream_stays_on_screen_marked_interrupted(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    openai_server.script(
        Reply(content="The answer is forty two and more", chunk_delay=0.05, cut_after=4),
        Reply(content="The answer is forty two and more", chunk_delay=0.05, cut_after=4),
        Reply(content="The answer is forty two and more", chunk_delay=0.05, cut_after=4),
    )
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, streamer, openai_llm, stream_interval=0.05):
        await discord_fake.user_message(dm, "answer", user_id=ALICE)
        await discord_fake.wait_for(
            lambda: any(m["content"].endswith(INTERRUPTED) for m in discord_fake.messages(dm))
        )
    contents = [m["content"] for m in discord_fake.messages(dm)]
    assert contents[0].startswith("The answer") and contents[0].endswith(INTERRUPTED)


async def test_typing_is_shown_while_the_model_works(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    openai_server.script(Reply("done thinking", delay=0.8))
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, chat, openai_llm):
        await discord_fake.user_message(dm, "think hard", user_id=ALICE)
        assert await texts(discord_fake, dm, 1) == ["done thinking"]
    assert dm in discord_fake.typing


async def test_the_same_template_gives_the_same_transcript_on_every_platform(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    lines = ["hello", "hmm, I am a Virgo", "love?", "money?"]
    stdout = io.StringIO()
    console = ConsoleAdapter(stdin=io.StringIO("".join(f"{x}\n" for x in lines)), stdout=stdout)
    async with (
        InMemoryStore() as store,
        Runtime(horoscope, llm=openai_llm, sender=console, store=store) as runtime,
    ):
        await console.run(runtime)
    console_replies = stdout.getvalue().splitlines()
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, horoscope, openai_llm):
        for line in lines:
            await discord_fake.user_message(dm, line, user_id=ALICE)
        discord_replies = await texts(discord_fake, dm, len(console_replies))
    assert console_replies == [
        WELCOME,
        "Ah, Virgo. What do you want to know?",
        "echo: love?",
        "echo: money?",
    ]
    assert discord_replies == console_replies


async def test_the_token_never_reaches_the_logs(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, horoscope, openai_llm) as (adapter, _runtime):
        await discord_fake.user_message(dm, "hi", user_id=ALICE)
        await texts(discord_fake, dm, 1)
        interaction = await discord_fake.slash_command("help", dm, user_id=ALICE)
        await discord_fake.wait_for(lambda: bool(interaction.followups))
        logging.getLogger("turbobot.adapters.discord").warning("token %s", discord_fake.token)
        assert discord_fake.token not in repr(adapter.settings)
    assert "WebSocket Event" in caplog.text  # discord.py's DEBUG logs were on
    assert discord_fake.token not in caplog.text
    # an interaction's token answers it for 15 minutes: it is a secret too
    assert "INTERACTION_CREATE" in caplog.text and "/webhooks/" in caplog.text
    assert interaction.token not in caplog.text
    assert "<redacted>" in caplog.text


def test_settings_errors_are_clear() -> None:
    with pytest.raises(Exception, match="DISCORD_BOT_TOKEN is not set"):
        DiscordSettings(token="")
    with pytest.raises(Exception, match="'loud' is not 'mention' or 'always'"):
        DiscordSettings(token="x", respond="loud")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="DISCORD_GATEWAY_URL must start with ws://"):
        DiscordSettings(token="x", gateway_url="http://127.0.0.1:1/gateway")
    with pytest.raises(Exception, match=r"need the total number of shards too \(--shard-count"):
        DiscordSettings(token="x", shard_ids=(0,))
    with pytest.raises(Exception, match="shard ids go from 0 to 1: 2 given"):
        DiscordSettings(token="x", shard_count=2, shard_ids=(2,))


async def test_a_wrong_token_is_a_configuration_error(discord_fake: FakeDiscord) -> None:
    settings = DiscordSettings(
        token="wrong-token", api_base_url=discord_fake.api_url, gateway_url=discord_fake.gateway_url
    )
    with pytest.raises(Exception, match="Discord refused the bot token") as raised:
        async with DiscordAdapter(settings):
            pass
    assert "wrong-token" not in str(raised.value)


async def test_a_missing_message_content_intent_is_a_configuration_error(
    openai_llm: OpenAILLM,
) -> None:
    async with FakeDiscord(allow_message_content=False) as fake:
        settings = DiscordSettings(
            token=fake.token, api_base_url=fake.api_url, gateway_url=fake.gateway_url
        )
        async with (
            DiscordAdapter(settings) as adapter,
            InMemoryStore() as store,
            Runtime(chat, llm=openai_llm, sender=adapter, store=store) as runtime,
        ):
            with pytest.raises(Exception, match="Message Content Intent"):
                await asyncio.wait_for(adapter.run(runtime, handle_signals=False), 10)


async def test_shards_split_the_servers(discord_fake: FakeDiscord, openai_llm: OpenAILLM) -> None:
    guilds = [discord_fake.add_guild(f"g{i}") for i in range(4)]
    shard_of = {g.id: (g.id >> 22) % 2 for g in guilds}
    assert set(shard_of.values()) == {0, 1}, "the fake's ids should spread over two shards"
    mine = next(g for g in guilds if shard_of[g.id] == 1)
    other = next(g for g in guilds if shard_of[g.id] == 0)
    async with running(discord_fake, chat, openai_llm, shard_count=2, shard_ids=(1,)):
        assert [i["shard"] for i in discord_fake.identifies] == [[1, 2]]
        await discord_fake.user_message(
            other.channels["general"], "not mine", user_id=ALICE, mention_bot=True
        )
        await discord_fake.user_message(
            mine.channels["general"], "mine", user_id=ALICE, mention_bot=True
        )
        assert await texts(discord_fake, mine.channels["general"], 1) == ["echo: mine"]
    assert discord_fake.messages(other.channels["general"]) == []


async def test_a_429_in_one_channel_does_not_stall_another(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    slow, quick = discord_fake.dm_channel(ALICE), discord_fake.dm_channel(BOB)
    discord_fake.fail("POST", rf"/channels/{slow}/messages", status=429, retry_after=2.0)
    async with running(discord_fake, horoscope, openai_llm):
        await discord_fake.user_message(slow, "hi", user_id=ALICE)
        await discord_fake.wait_for(
            lambda: any(p == f"/channels/{slow}/messages" for _m, p in discord_fake.requests)
        )
        started = asyncio.get_running_loop().time()
        await discord_fake.user_message(quick, "hi", user_id=BOB)
        assert await texts(discord_fake, quick, 1) == [WELCOME]
        assert discord_fake.messages(slow) == []  # still waiting out its 429
        assert asyncio.get_running_loop().time() - started < 1.5
        assert await texts(discord_fake, slow, 1) == [WELCOME]


async def test_a_reply_chain_is_followed_after_a_restart(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, tmp_path: Path
) -> None:
    """The adapter's memory of its messages is gone after a restart: the chain is found
    through the message the bot's reply answered."""
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    async with SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store:
        async with running(discord_fake, horoscope, openai_llm, store):
            await discord_fake.user_message(general, "hi", user_id=ALICE, mention_bot=True)
            assert await texts(discord_fake, general, 1) == [WELCOME]
        first = discord_fake.messages(general)[0]
        async with running(discord_fake, horoscope, openai_llm, store):
            await discord_fake.user_message(
                general, "I am a Leo", user_id=BOB, reply_to=first["id"]
            )
            shown = await texts(discord_fake, general, 2)
        lines = await store.transcript(ChannelKey("discord", str(general), None, str(ALICE)))
    assert shown[1] == "Ah, Leo. What do you want to know?"
    assert [line.text for line in lines if line.role == "user"] == ["hi", "I am a Leo"]


async def test_hostile_text_is_answered_and_other_channels_go_on(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    alice, bob = discord_fake.dm_channel(ALICE), discord_fake.dm_channel(BOB)
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(discord_fake, chat, openai_llm, store) as (_adapter, runtime),
    ):
        await discord_fake.user_message(
            alice, "lone \ud800 surrogate and NUL \x00 here", user_id=ALICE
        )
        await discord_fake.user_message(alice, "x" * 100_000, user_id=ALICE)
        await discord_fake.user_message(alice, "\u202eRTL override \u200f", user_id=ALICE)
        await discord_fake.user_message(bob, "hello", user_id=BOB)
        assert await texts(discord_fake, bob, 1) == ["echo: hello"]
        await discord_fake.wait_for(lambda: len(openai_server.requests) >= 4)
        await runtime.join()
        shown = [m["content"] for m in discord_fake.messages(alice)]
        lines = await store.transcript(ChannelKey("discord", str(alice)))
    # each hostile message is answered (with a notice saying what was changed or cut)
    assert shown[0].startswith("Part of your message could not be read")
    assert any(t.startswith("echo: lone") and "surrogate and NUL" in t for t in shown)
    assert shown[-1] == "echo: \u202eRTL override \u200f"
    assert all(0 < len(text) <= MESSAGE_LIMIT for text in shown)
    users = [line.text for line in lines if line.role == "user"]
    # the model saw the capped text (the inbox keeps the whole: tests/test_hardening.py)
    assert len(users) == 3 and len(users[1]) == 16_000


def test_settings_come_from_flags_then_the_environment() -> None:
    import argparse

    from turbobot.adapters.discord import settings_from
    from turbobot.platforms import Launch

    def launch(env: dict[str, str], **flags: Any) -> Launch:
        values = {"respond": None, "trigger": None, "group_mode": None, "threads": False}
        values |= {"shard_count": None, "shard_ids": None, **flags}
        return Launch(argparse.Namespace(**values), env, RuntimeSettings(), parts=None)  # type: ignore[arg-type]

    env = {"DISCORD_BOT_TOKEN": " tok ", "DISCORD_SHARD_COUNT": "8", "DISCORD_SHARD_IDS": "0-2,5"}
    settings = settings_from(launch({**env, "DISCORD_RESPOND": "always", "DISCORD_THREADS": "1"}))
    assert settings.token == "tok" and settings.shard_count == 8
    assert settings.shard_ids == (0, 1, 2, 5) and settings.respond == "always" and settings.threads
    flagged = settings_from(launch(env, shard_count=4, shard_ids="3", group_mode="shared"))
    assert (flagged.shard_count, flagged.shard_ids, flagged.group_mode) == (4, (3,), "shared")
    with pytest.raises(Exception, match="--shard-ids must list shard numbers"):
        settings_from(launch(env, shard_ids="0-x"))
    with pytest.raises(Exception, match="DISCORD_SHARD_COUNT must be a whole number"):
        settings_from(launch({**env, "DISCORD_SHARD_COUNT": "abc"}))
    with pytest.raises(Exception, match="--shard-ids: the range 3-1 is backwards"):
        settings_from(launch(env, shard_ids="3-1"))
    with pytest.raises(Exception, match=r"DISCORD_SHARD_IDS must list shard numbers.*'-1'"):
        settings_from(launch({**env, "DISCORD_SHARD_IDS": "-1"}))
    with pytest.raises(Exception, match=r"shard count \(--shard-count or DISCORD_SHARD_COUNT"):
        settings_from(launch(env, shard_count=0))
    with pytest.raises(Exception, match=r"with 8 shard\(s\), shard ids go from 0 to 7: 9 given"):
        settings_from(launch(env, shard_ids="9"))


async def test_review_findings_mentions_keep_code_indents_and_replies_answer_the_oldest(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    code = "fix this:\n```python\ndef f():\n    return 1\n```"
    async with running(discord_fake, chat, openai_llm):
        first = await discord_fake.user_message(general, code, user_id=ALICE, mention_bot=True)
        await discord_fake.user_message(general, "and this", user_id=ALICE, mention_bot=True)
        shown = await texts(discord_fake, general, 2)
    assert "    return 1" in openai_server.requests[0]["messages"][-1]["content"]
    assert shown[0].startswith("echo: fix this:")
    # the first reply answers the first message, not the latest one
    reference = discord_fake.messages(general)[0]["message_reference"]
    assert str(reference["message_id"]) == first["id"]


async def test_review_findings_shared_media_and_a_400_that_cannot_succeed(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, caplog: pytest.LogCaptureFixture
) -> None:
    guild = discord_fake.add_guild(channels=("general", "archived"))
    general, archived = guild.channels["general"], guild.channels["archived"]
    discord_fake.fail("POST", rf"/channels/{archived}/messages", status=400, code=50083, times=None)
    async with running(discord_fake, chat, openai_llm, group_mode="shared", respond="always") as (
        _a,
        runtime,
    ):
        await discord_fake.user_message(
            general, "", user_id=BOB, username="Bob", attachments=[PHOTO]
        )
        assert await texts(discord_fake, general, 1) == [
            "I can only read text messages, sorry: please type your message."
        ]
        await discord_fake.user_message(archived, "hello", user_id=BOB, mention_bot=True)
        await discord_fake.wait_for(
            lambda: any(p == f"/channels/{archived}/messages" for _m, p in discord_fake.requests)
        )
        await runtime.join()
    posts = [
        p for m, p in discord_fake.requests if m == "POST" and p.endswith(f"{archived}/messages")
    ]
    assert len(posts) == 1  # a 400 is not asked again
    assert "cannot be delivered" in caplog.text


def test_discord_py_reads_and_writes_json_with_lone_surrogates() -> None:
    """The fake server cannot send what discord.py's orjson decoder refuses (it writes
    valid UTF-8), so the fallback the adapter installs is checked on discord.py itself."""
    import discord.utils

    from turbobot.adapters.discord import _tolerate_lone_surrogates

    _tolerate_lone_surrogates()
    frame = '{"t":"MESSAGE_CREATE","d":{"content":"lone \\ud800 here"}}'
    assert discord.utils._from_json(frame)["d"]["content"] == "lone \ud800 here"
    assert discord.utils._from_json(frame.encode())["d"]["content"] == "lone \ud800 here"
    assert '"lone \\ud800"' in discord.utils._to_json({"content": "lone \ud800"})


async def test_a_slash_command_behind_a_generation_gets_its_own_answer(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    """The interaction is answered by the reply to the command, not by whatever reply
    comes next in the conversation (here: the one to the message before it)."""
    openai_server.script(Reply("a slow answer", delay=0.8))
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, chat, openai_llm):
        question = await discord_fake.user_message(dm, "question", user_id=ALICE)
        await discord_fake.wait_for(lambda: len(openai_server.requests) == 1)
        interaction = await discord_fake.slash_command("help", dm, user_id=ALICE)
        await discord_fake.wait_for(lambda: bool(interaction.followups))
        shown = await texts(discord_fake, dm, 1)
    assert shown == ["a slow answer"]
    assert str(discord_fake.messages(dm)[0]["message_reference"]["message_id"]) == question["id"]
    assert "/reset" in interaction.followups[0]["content"]  # the help text


async def test_a_command_that_answers_nothing_takes_its_thinking_away(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    async def quiet(call: CommandCall) -> str | None:
        return None

    bot = chat.configure(commands=[Command("quiet", "Answers nothing", quiet)])
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, bot, openai_llm):
        interaction = await discord_fake.slash_command("quiet", dm, user_id=ALICE)
        # at once, not after the 14 minutes an interaction may wait for its answer
        await discord_fake.wait_for(lambda: interaction.original_deleted, timeout=5)
        await discord_fake.user_message(dm, "hello", user_id=ALICE)
        assert await texts(discord_fake, dm, 1) == ["echo: hello"]
    assert interaction.callbacks[0]["type"] == 5 and interaction.followups == []


async def test_a_long_429_on_a_new_thread_does_not_stall_other_channels(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups on the way in (a new thread, a reply chain's message) are bounded: the
    queue of received messages is ordered, so waiting out a long 429 there would hold
    up every channel."""
    monkeypatch.setattr("turbobot.adapters.discord._LOOKUP_TIMEOUT", 0.3)
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    dm = discord_fake.dm_channel(BOB)
    discord_fake.fail("POST", r".*/threads", status=429, retry_after=30.0)
    async with running(discord_fake, chat, openai_llm, threads=True):
        started = asyncio.get_running_loop().time()
        await discord_fake.user_message(general, "open one", user_id=ALICE, mention_bot=True)
        await discord_fake.user_message(dm, "me too", user_id=BOB)
        assert await texts(discord_fake, dm, 1) == ["echo: me too"]
        # no thread: answered in the channel instead
        assert await texts(discord_fake, general, 1) == ["echo: open one"]
        assert asyncio.get_running_loop().time() - started < 5
    assert discord_fake.threads_created == []


async def test_a_stop_that_abandons_a_stream_takes_its_preview_away(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    """The abandoned step is done again, whole, on the next start: a half preview left
    on screen would be read twice."""
    words = " ".join(f"word{i}" for i in range(200))
    openai_server.script(Reply(content=words, chunk_delay=0.05))
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, streamer, openai_llm, stream_interval=0.05, stop_grace=0.3):
        await discord_fake.user_message(dm, "stream it", user_id=ALICE)
        await discord_fake.wait_for(lambda: bool(discord_fake.messages(dm)))
        preview = discord_fake.messages(dm)[0]
        assert preview["content"] != words
    assert int(preview["id"]) in discord_fake.deleted
    assert discord_fake.messages(dm) == []


async def test_a_server_discord_py_has_not_cached_is_not_taken_for_a_dm(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM
) -> None:
    guild = discord_fake.add_guild()
    general = guild.channels["general"]
    dm = discord_fake.dm_channel(BOB)
    async with running(discord_fake, chat, openai_llm) as (adapter, _runtime):
        await discord_fake.dispatch("GUILD_DELETE", {"id": str(guild.id)})
        await discord_fake.wait_for(lambda: adapter.client.get_guild(guild.id) is None)
        await discord_fake.user_message(general, "talking among ourselves", user_id=ALICE)
        await discord_fake.user_message(dm, "hello", user_id=BOB)
        assert await texts(discord_fake, dm, 1) == ["echo: hello"]
        assert discord_fake.messages(general) == []  # not addressed: no answer
        await discord_fake.user_message(general, "now you", user_id=ALICE, mention_bot=True)
        assert await texts(discord_fake, general, 1) == ["echo: now you"]


async def test_a_preview_inside_a_code_block_closes_it_before_the_ellipsis(
    discord_fake: FakeDiscord, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    code = "```python\n" + "".join(f"x{i} = {i}\n" for i in range(60)) + "```\nThat is all."
    openai_server.script(Reply(content=code, chunk_delay=0.01))
    dm = discord_fake.dm_channel(ALICE)
    async with running(discord_fake, streamer, openai_llm, stream_interval=0.05):
        await discord_fake.user_message(dm, "code please", user_id=ALICE)
        await discord_fake.wait_for(lambda: texts_now(discord_fake, dm) == [code], timeout=10)
    previews = [body["content"] for body in discord_fake.sent] + [
        e.content for e in discord_fake.edits
    ]
    shown = [p for p in previews if p != code]
    in_code = [p for p in shown if p.endswith("\n```\n…")]
    assert in_code, "no preview was shown while the code was streaming"
    # the block is closed before the ellipsis, so "…" is not shown as code; a preview
    # past the block ends in " …" as usual
    assert all(p.count("```") == 2 for p in in_code)
    assert all(p.endswith(" …") and p.count("```") == 2 for p in shown if p not in in_code)


def texts_now(fake: FakeDiscord, channel: int) -> list[str]:
    return [m["content"] for m in fake.messages(channel)]
