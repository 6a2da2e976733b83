"""discord.py baseline: on_message + client.wait_for('message', check=...).

usage: python bench_discord.py CHATS [wait_for]

Each "chat" is a DM channel with one user. Incoming messages are raw gateway MESSAGE_CREATE
payloads (dicts) fed to ConnectionState.parse_message_create(), which is what the gateway
websocket handler calls: it builds a real discord.Message (DMChannel, User cache, message
cache with max_messages=1000) and calls client.dispatch('message', msg).
channel.send() runs the real Messageable.send path; only HTTPClient.request is replaced by
an in-process stub that JSON-encodes the payload, records it, and returns a canned message
payload (JSON-decoded), which discord.py turns into a Message object as usual.

Handlers run as tasks (discord.py schedules every on_message as a task), so after feeding a
phase we wait until the expected number of replies has been recorded.
State lives only in memory (pending wait_for futures); there is no persistence option.
"""

import asyncio
import json
import sys

import discord

import benchlib as B

BOT_ID = 123456789
BOT_USER = {
    "id": str(BOT_ID),
    "username": "bench_bot",
    "discriminator": "0",
    "avatar": None,
    "global_name": None,
    "bot": True,
    "verified": True,
    "mfa_enabled": False,
    "flags": 0,
}
LOG = B.ReplyLog()


class Bench:
    def __init__(self):
        self.msg_id = 10**17
        self.target = 0
        self.done = None

    async def fake_request(self, route, *, files=None, form=None, **kwargs):
        if route.method == "POST" and route.path == "/channels/{channel_id}/messages":
            body = json.dumps(kwargs["json"])  # what the real client sends
            payload = json.loads(body)
            LOG.record(route.channel_id, payload["content"])
            self.msg_id += 1
            resp = json.dumps(
                {
                    "id": str(self.msg_id),
                    "channel_id": str(route.channel_id),
                    "type": 0,
                    "author": BOT_USER,
                    "content": payload["content"],
                    "timestamp": "2024-01-01T00:00:00+00:00",
                    "edited_timestamp": None,
                    "tts": False,
                    "mention_everyone": False,
                    "mentions": [],
                    "mention_roles": [],
                    "attachments": [],
                    "embeds": [],
                    "pinned": False,
                }
            )
            if len(LOG.sent) >= self.target and self.done is not None and not self.done.done():
                self.done.set_result(None)
            return json.loads(resp)
        raise RuntimeError(f"unexpected HTTP call {route.method} {route.path}")

    async def wait_replies(self, n):
        self.target = n
        if len(LOG.sent) < n:
            self.done = asyncio.get_running_loop().create_future()
            await self.done


def make_payload(uid_idx, msg_id, text):
    uid = B.BASE_ID + uid_idx
    return {
        "id": str(msg_id),
        "channel_id": str(uid),
        "type": 0,
        "author": {
            "id": str(uid),
            "username": f"u{uid_idx}",
            "discriminator": "0",
            "avatar": None,
            "global_name": None,
        },
        "content": text,
        "timestamp": "2024-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
    }


async def main(chats, variant):
    if variant != "wait_for":
        sys.exit(f"unknown variant {variant}")
    intents = discord.Intents.default()
    intents.message_content = True
    client = discord.Client(intents=intents)
    bench = Bench()

    @client.event
    async def on_message(msg):
        if msg.author.id == BOT_ID or msg.content != "hi":
            return
        await msg.channel.send(B.ASK_TEXT)
        reply = await client.wait_for(
            "message",
            check=lambda m: m.author.id == msg.author.id and m.channel.id == msg.channel.id,
        )
        await reply.channel.send(f"Hello {reply.content}")

    async with client:  # _async_setup_hook(): binds loop; no login, no gateway
        client.http.request = bench.fake_request
        state = client._connection  # noqa: SLF001
        state.user = discord.ClientUser(state=state, data=BOT_USER)  # what READY would set
        feed = state.parse_message_create

        for i in B.WARMUP_IDS:
            feed(make_payload(i, 4 * 10**17 + i, "hi"))
        await bench.wait_replies(B.WARMUP)
        for i in B.WARMUP_IDS:
            feed(make_payload(i, 5 * 10**17 + i, B.name_for(i)))
        await bench.wait_replies(2 * B.WARMUP)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not client._listeners.get("message")  # noqa: SLF001
        LOG.reset()

        rss_base = B.rss_mb()
        t = B.Timer()
        t.start()
        for i in range(chats):  # inputs generated lazily, as in the other scripts
            feed(make_payload(i, 2 * 10**17 + i, "hi"))
        await bench.wait_replies(chats)
        while len(client._listeners.get("message", ())) < chats:  # noqa: SLF001
            await asyncio.sleep(0)
        t.mark("phase1")
        rss_waiting = B.rss_mb()
        waiting = len(client._listeners.get("message", ()))  # noqa: SLF001
        for i in range(chats):
            feed(make_payload(i, 3 * 10**17 + i, B.name_for(i)))
        await bench.wait_replies(2 * chats)
        t.mark("end")
        await asyncio.sleep(0)

    B.emit(
        "discord.py",
        variant,
        chats,
        t.marks["end"],
        LOG.verify(chats) and waiting == chats,
        rss_base,
        rss_waiting,
        t.cpu_marks["end"],
        waiting_seen=waiting,
    )


if __name__ == "__main__":
    c = B.parse_chats()
    v = sys.argv[2] if len(sys.argv) > 2 else "wait_for"
    asyncio.run(main(c, v))
