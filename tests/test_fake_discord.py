"""The fake Discord server against the real discord.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fakes.discord_server import FakeDiscord, point_discord_py_at

with warnings.catch_warnings():
    # discord.py imports audioop (voice), deprecated since Python 3.11
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord
    from discord import app_commands

ALICE = 501
BOB = 502
MESSAGE_CONTENT = 1 << 15


def intents() -> discord.Intents:
    chosen = discord.Intents.default()
    chosen.message_content = True
    return chosen


class _Inbox:
    """What the test clients share: users' messages land in ``inbox``; no 5 s sleep before
    a re-IDENTIFY (discord.py's default before_identify_hook)."""

    inbox: asyncio.Queue[discord.Message]

    async def on_message(self, message: discord.Message) -> None:
        if not message.author.bot:
            self.inbox.put_nowait(message)

    async def next_message(self) -> discord.Message:
        return await asyncio.wait_for(self.inbox.get(), 5)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        return None


class Bot(_Inbox, discord.Client):
    def __init__(self, **options: Any) -> None:
        super().__init__(intents=options.pop("intents", intents()), guild_ready_timeout=0.05)
        self.inbox = asyncio.Queue()


class ShardedBot(_Inbox, discord.AutoShardedClient):
    def __init__(self, shard_count: int) -> None:
        super().__init__(intents=intents(), guild_ready_timeout=0.05, shard_count=shard_count)
        self.inbox = asyncio.Queue()


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        with point_discord_py_at(server):
            yield server


@contextlib.asynccontextmanager
async def running(client: discord.Client, token: str) -> AsyncIterator[discord.Client]:
    """``client`` logged in and ready; closed after."""
    async with client:
        task = asyncio.create_task(client.start(token))
        ready = asyncio.create_task(client.wait_until_ready())
        done, _ = await asyncio.wait({task, ready}, timeout=10, return_when="FIRST_COMPLETED")
        if ready not in done:
            ready.cancel()
            if task in done:
                task.result()  # raises why it stopped
            raise TimeoutError("the client did not get ready")
        try:
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, 10)


def text_channel(client: discord.Client, channel_id: int) -> discord.TextChannel:
    channel = client.get_channel(channel_id)
    assert isinstance(channel, discord.TextChannel)
    return channel


# -- connecting ------------------------------------------------------------------------


async def test_login_and_ready_with_guilds(fake: FakeDiscord) -> None:
    first = fake.add_guild("first", channels=("general", "random"))
    second = fake.add_guild("second")
    client = Bot()
    async with running(client, fake.token):
        assert client.user is not None and client.user.id == fake.bot_id
        assert client.user.name == fake.bot_name and client.user.bot
        assert client.application_id == fake.application_id
        assert sorted(g.name for g in client.guilds) == ["first", "second"]
        guild = client.get_guild(first.id)
        assert guild is not None
        assert [c.name for c in guild.text_channels] == ["general", "random"]
        assert guild.me is not None and guild.me.id == fake.bot_id
        assert (
            text_channel(client, first.channels["general"]).permissions_for(guild.me).send_messages
        )
    assert fake.requests[:2] == [("GET", "/users/@me"), ("GET", "/oauth2/applications/@me")]
    assert fake.calls[0].authorization == f"Bot {fake.token}"
    (identify,) = fake.identifies
    assert identify["token"] == fake.token and identify["intents"] & MESSAGE_CONTENT
    (conn,) = fake.connections
    assert conn.query["v"] == "10" and conn.query["encoding"] == "json"
    assert conn.sent[0]["op"] == 10  # HELLO first
    ready = conn.events("READY")[0]["d"]
    assert ready["resume_gateway_url"] == fake.resume_gateway_url
    assert {g["id"] for g in ready["guilds"]} == {str(first.id), str(second.id)}
    assert [e["d"]["name"] for e in conn.events("GUILD_CREATE")] == ["first", "second"]
    assert fake.heartbeats >= 1  # discord.py beats at once after HELLO


async def test_on_message_gets_a_dm_and_a_guild_message(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    general = guild.channels["general"]
    dm = fake.dm_channel(ALICE)
    client = Bot()
    async with running(client, fake.token):
        sent_dm = await fake.user_message(dm, "hello in private", user_id=ALICE, username="ann")
        received = await client.next_message()
        assert isinstance(received.channel, discord.DMChannel)
        assert received.guild is None and received.content == "hello in private"
        assert received.author.id == ALICE and received.author.name == "ann"
        assert received.id == int(sent_dm["id"])

        sent = await fake.user_message(general, "hi bot", user_id=BOB, mention_bot=True)
        received = await client.next_message()
        assert isinstance(received.author, discord.Member)
        assert received.author.id == BOB and received.guild is not None
        assert received.guild.id == guild.id and received.channel.id == general
        assert client.user in received.mentions
        assert received.content == f"<@{fake.bot_id}> hi bot" == sent["content"]
    assert "guild_id" not in sent_dm and sent["guild_id"] == str(guild.id)
    assert BOB in guild.members  # added as they spoke
    assert [m["content"] for m in fake.user_messages] == ["hello in private", sent["content"]]


# -- what the bot sends -------------------------------------------------------------------


async def test_a_reply_with_allowed_mentions_is_recorded(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    general = guild.channels["general"]
    client = Bot()
    async with running(client, fake.token):
        await fake.user_message(general, "question?", user_id=ALICE)
        question = await client.next_message()
        reply = await question.reply(
            "answer", allowed_mentions=discord.AllowedMentions.none(), mention_author=False
        )
        assert reply.reference is not None and reply.reference.message_id == question.id
    (sent,) = fake.sent
    assert sent["id"] == str(reply.id) and sent["channel_id"] == str(general)
    assert sent["content"] == "answer"
    assert sent["message_reference"]["message_id"] == question.id  # as discord.py sent it
    assert sent["allowed_mentions"] == {"parse": [], "replied_user": False}
    (shown,) = fake.messages(general)
    assert shown["message_reference"]["message_id"] == str(question.id)  # as Discord returns it
    assert shown["referenced_message"]["content"] == "question?"
    assert shown["type"] == 19 and shown["author"]["id"] == str(fake.bot_id)


async def test_edit_typing_and_delete(fake: FakeDiscord) -> None:
    dm = fake.dm_channel(ALICE)
    client = Bot()
    async with running(client, fake.token):
        await fake.user_message(dm, "hi", user_id=ALICE)
        channel = (await client.next_message()).channel
        async with channel.typing():
            message = await channel.send("draft")
        await message.edit(content="final")
        doomed = await channel.send("oops")
        await doomed.delete()
    assert fake.typing == [dm]
    assert fake.edits == [(message.id, "final")]
    assert fake.edits[0].at >= fake.calls_to("POST", rf"/channels/{dm}/messages")[0].at
    assert fake.deleted == [doomed.id]
    assert fake.texts(dm) == ["final"]  # current state, without the deleted one
    assert [s["content"] for s in fake.sent] == ["draft", "oops"]


async def test_a_429_is_waited_out_and_retried(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    general = guild.channels["general"]
    client = Bot()
    async with running(client, fake.token):
        fake.fail("POST", rf"/channels/{general}/messages", status=429, retry_after=0.05)
        message = await text_channel(client, general).send("after a 429")
    path = f"/channels/{general}/messages"
    assert [s for s in fake.statuses if s[1] == path] == [("POST", path, 429), ("POST", path, 200)]
    limited, retried = fake.calls_to("POST", path)
    assert limited.response["retry_after"] == 0.05 and limited.fault
    assert retried.at - limited.at >= 0.05
    assert fake.texts(general) == ["after a 429"] and fake.sent[0]["id"] == str(message.id)


async def test_errors_answer_with_discord_codes(fake: FakeDiscord) -> None:
    guild = fake.add_guild(channels=("general", "readonly"))
    general, readonly = guild.channels["general"], guild.channels["readonly"]
    fake.forbid(readonly)
    client = Bot()
    async with running(client, fake.token):
        with pytest.raises(discord.Forbidden) as forbidden:
            await text_channel(client, readonly).send("may I?")
        assert forbidden.value.code == 50013
        fake.fail("GET", rf"/channels/{general}/messages/\d+", status=404, code=10008)
        with pytest.raises(discord.NotFound) as not_found:
            await text_channel(client, general).fetch_message(1234)
        assert not_found.value.code == 10008
        with pytest.raises(discord.HTTPException) as too_long:
            await text_channel(client, general).send("x" * 2001)
        assert too_long.value.code == 50035 and too_long.value.status == 400
        with pytest.raises(discord.NotFound):
            await client.http.request(discord.http.Route("GET", "/no/such/route"))
        fake.fail("*", r"/channels/\d+/typing", status=503)
        with pytest.raises(discord.DiscordServerError):
            await text_channel(client, general).typing()
    assert fake.unknown == [("GET", "/no/such/route")]
    assert fake.sent == [] and fake.typing == []
    assert [s[2] for s in fake.statuses[2:]] == [403, 404, 400, 404, 503]


async def test_files_both_ways(fake: FakeDiscord) -> None:
    dm = fake.dm_channel(ALICE)
    client = Bot()
    async with running(client, fake.token):
        note = fake.make_attachment("note.txt", b"hello file", content_type="text/plain")
        await fake.user_message(dm, "see attached", user_id=ALICE, attachments=[note])
        received = await client.next_message()
        assert await received.attachments[0].read() == b"hello file"
        upload = discord.File(io.BytesIO(b"reply bytes"), filename="reply.txt")
        await received.channel.send("here", file=upload)
    (sent,) = fake.sent
    assert sent["content"] == "here" and sent["files"][0].content == b"reply bytes"
    (shown,) = fake.messages(dm)
    assert shown["attachments"][0]["filename"] == "reply.txt"


async def test_threads(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    general = guild.channels["general"]
    side = fake.add_thread(guild, general, "side talk")
    client = Bot()
    async with running(client, fake.token):
        thread = client.get_channel(side)
        assert isinstance(thread, discord.Thread) and thread.parent_id == general
        await fake.user_message(side, "in the thread", user_id=ALICE)
        assert (await client.next_message()).channel.id == side

        await fake.user_message(general, "let's talk elsewhere", user_id=ALICE)
        starter = await client.next_message()
        opened = await starter.create_thread(name="elsewhere")
        await opened.send("welcome")
        await fake.user_message(opened.id, "thanks", user_id=ALICE)
        assert (await client.next_message()).channel == opened

        late = fake.add_thread(guild, general, "late")  # THREAD_CREATE while connected
        await fake.wait_for(lambda: client.get_channel(late) is not None)
    assert [t["name"] for t in fake.threads_created] == ["elsewhere"]
    assert fake.threads_created[0]["id"] == str(starter.id) == str(opened.id)
    assert fake.texts(opened.id) == ["welcome"]


# -- slash commands ------------------------------------------------------------------------


async def test_slash_command_synced_invoked_and_answered(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    general = guild.channels["general"]
    client = Bot()
    tree = app_commands.CommandTree(client)

    @tree.command(name="echo", description="Say it back")
    async def echo(interaction: discord.Interaction, word: str) -> None:
        await interaction.response.send_message(f"you said {word}")
        await interaction.followup.send("and one more thing")

    @tree.command(name="slow", description="Think first")
    async def slow(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="done thinking")

    async with running(client, fake.token):
        synced = await tree.sync()
        assert [c.name for c in synced] == ["echo", "slow"]
        assert (await tree.fetch_commands())[0].id == synced[0].id
        record = await fake.slash_command("echo", general, user_id=ALICE, options={"word": "hi"})
        await fake.wait_for(lambda: bool(record.followups))
        deferred = await fake.slash_command("slow", general, user_id=BOB)
        await fake.wait_for(lambda: bool(deferred.edits))
    assert [c["name"] for c in fake.commands] == ["echo", "slow"]
    option = fake.commands[0]["options"][0]
    assert (option["name"], option["type"], option["required"]) == ("word", 3, True)
    assert record.payload["data"]["options"] == [{"name": "word", "type": 3, "value": "hi"}]
    assert record.callbacks == [{"type": 4, "data": {"tts": False, "content": "you said hi"}}]
    assert record.response_type == 4 and record.content == "you said hi"
    assert record.followups[0]["content"] == "and one more thing"
    assert deferred.callbacks == [{"type": 5}]
    assert deferred.edits[0]["content"] == "done thinking" == deferred.content
    assert deferred.original is not None and deferred.original["flags"] & 128 == 0
    assert fake.sent == []  # interaction responses are not channel messages of the bot


# -- reconnecting ------------------------------------------------------------------------


async def test_resume_replays_what_was_missed_and_a_duplicate_arrives_twice(
    fake: FakeDiscord,
) -> None:
    dm = fake.dm_channel(ALICE)
    client = Bot()
    resumed = asyncio.Event()
    client.event(_setter("on_resumed", resumed))
    async with running(client, fake.token):
        await fake.user_message(dm, "before", user_id=ALICE)
        assert (await client.next_message()).content == "before"
        await fake.force_reconnect(resume=True)
        # dispatched while the client is away: kept for the resume
        during = await fake.user_message(dm, "during", user_id=ALICE)
        await fake.wait_connected(1)
        await asyncio.wait_for(resumed.wait(), 5)
        assert (await client.next_message()).id == int(during["id"])
        await fake.redeliver_last()
        duplicate = await client.next_message()
        assert duplicate.id == int(during["id"])  # the adapter has to drop it

        await fake.disconnect()  # abruptly: no close frame
        await fake.wait_for(lambda: fake.resumes == 2)
        await fake.user_message(dm, "after", user_id=ALICE)
        assert (await client.next_message()).content == "after"
    assert len(fake.identifies) == 1 and fake.invalid_sessions == 0
    first, second, third = fake.connections
    session_id = first.events("READY")[0]["d"]["session_id"]
    assert [r["session_id"] for r in fake.resume_requests] == [session_id, session_id]
    assert second.path == third.path == "/gateway-resume"
    assert [e["d"]["content"] for e in second.events("MESSAGE_CREATE")] == ["during", "during"]
    assert second.events()[0]["s"] > first.events()[-1]["s"]


async def test_reconnect_without_resume_identifies_again(fake: FakeDiscord) -> None:
    guild = fake.add_guild()
    client = Bot()
    async with running(client, fake.token):
        await fake.force_reconnect(resume=False)
        await fake.wait_for(lambda: len(fake.identifies) == 2)
        await fake.wait_connected(1)
        await fake.user_message(guild.channels["general"], "still there?", user_id=ALICE)
        assert (await client.next_message()).content == "still there?"
    assert fake.resumes == 0 and fake.invalid_sessions == 1
    first, refused, fresh = fake.connections
    assert {"op": 9, "d": False} in refused.sent
    # (discord.py identifies again on the resume URL it last used: either path is served)
    assert [p["op"] for p in fresh.received if p["op"] != 1] == [2]
    assert len({c.events("READY")[0]["d"]["session_id"] for c in (first, fresh)}) == 2


async def test_shards_get_their_own_guilds(fake: FakeDiscord) -> None:
    guilds = [fake.add_guild(f"g{i}") for i in range(4)]
    assert [g.shard(2) for g in guilds] == [0, 1, 0, 1]
    dm = fake.dm_channel(ALICE)
    client = ShardedBot(shard_count=2)
    async with running(client, fake.token):
        assert sorted(i["shard"] for i in fake.identifies) == [[0, 2], [1, 2]]
        for guild in guilds[:2]:
            await fake.user_message(guild.channels["general"], f"in {guild.name}", user_id=ALICE)
        await fake.user_message(dm, "in private", user_id=ALICE)
        received = {(await client.next_message()).content for _ in range(3)}
        assert received == {"in g0", "in g1", "in private"}
        assert [g.shard_id for g in client.guilds if g.id == guilds[1].id] == [1]
    by_shard = {
        tuple(c.shard or ()): [e["d"]["content"] for e in c.events("MESSAGE_CREATE")]
        for c in fake.connections
    }
    assert by_shard == {(0, 2): ["in g0", "in private"], (1, 2): ["in g1"]}
    ready_guilds = {
        tuple(c.shard or ()): {g["id"] for g in c.events("READY")[0]["d"]["guilds"]}
        for c in fake.connections
    }
    assert ready_guilds[(1, 2)] == {str(guilds[1].id), str(guilds[3].id)}
    assert fake.requests.count(("GET", "/gateway/bot")) == 0  # shard_count was given


# -- refusals ------------------------------------------------------------------------------


async def test_a_wrong_token_is_a_login_failure(fake: FakeDiscord) -> None:
    client = Bot()
    async with client:
        with pytest.raises(discord.LoginFailure):
            await client.start("wrong-token")
    assert fake.statuses == [("GET", "/users/@me", 401)]
    assert fake.calls[0].response == {"message": "401: Unauthorized", "code": 0}
    assert fake.connections == []


async def test_disallowed_intents_close_the_gateway() -> None:
    async with FakeDiscord(allow_message_content=False) as strict:
        with point_discord_py_at(strict):
            client = Bot()
            async with client:
                with pytest.raises(discord.PrivilegedIntentsRequired):
                    await asyncio.wait_for(client.start(strict.token), 10)
            assert strict.identifies[0]["intents"] & MESSAGE_CONTENT
            assert [c.server_close_code for c in strict.connections] == [4014]

            # without the intent it connects, and sees no content of others' guild messages
            guild = strict.add_guild()
            plain = Bot(intents=discord.Intents.default())
            async with running(plain, strict.token):
                general = guild.channels["general"]
                await strict.user_message(general, "secret", user_id=ALICE)
                await strict.user_message(general, "for you", user_id=ALICE, mention_bot=True)
                hidden, shown = await plain.next_message(), await plain.next_message()
            assert hidden.content == "" and shown.content.endswith("for you")


def _setter(name: str, event: asyncio.Event) -> Any:
    async def handler(*args: object) -> None:
        event.set()

    handler.__name__ = name
    return handler
