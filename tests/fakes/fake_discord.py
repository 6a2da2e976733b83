"""A fake Discord (REST API + gateway) on 127.0.0.1 for the real discord.py client.

Enough of Discord for a bot: login (``/users/@me``, ``/oauth2/applications/@me``), the
gateway (HELLO, IDENTIFY, READY, GUILD_CREATE, heartbeats, RESUME with replay, INVALID
SESSION, RECONNECT, sharding by guild id), messages (create, edit, delete, fetch),
typing, threads, DM channels, application commands and interactions (callback,
follow-ups). Tests act as users (``user_message``, ``slash_command``...), inject faults
(``fail``, ``forbid``) and read what the bot did (``sent``, ``messages``, ``edits``,
``typing``, ``commands``, ``identifies``, ``requests``).

Point discord.py at it with the two class attributes it builds its URLs from (the
adapter does this from ``DISCORD_API_BASE_URL`` / ``DISCORD_GATEWAY_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

MESSAGE_CONTENT = 1 << 15
DISCORD_EPOCH_MS = 1_420_070_400_000
JSON = "application/json"  # exactly: discord.py decodes only this content type


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Guild:
    id: int
    name: str
    channels: dict[str, int]
    threads: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Edit:
    message_id: int
    content: str
    at: float


@dataclass
class Interaction:
    """A slash command a user sent, and how the bot answered it."""

    id: int
    token: str
    channel_id: int
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    retry_after: float
    times: int
    code: int | None
    message: str | None


class _Session:
    def __init__(self, session_id: str, shard: list[int]) -> None:
        self.id = session_id
        self.shard = shard
        self.seq = 0
        self.history: list[dict[str, Any]] = []  # dispatched events, for RESUME
        self.ws: web.WebSocketResponse | None = None


class FakeDiscord:
    """Discord's REST API and gateway, in one aiohttp server on 127.0.0.1."""

    def __init__(
        self,
        *,
        token: str = "fake-discord-token.abc.xyz",
        bot_name: str = "turbobot",
        allow_message_content: bool = True,
        heartbeat_interval_ms: int = 41250,
    ) -> None:
        self.token = token
        self.bot_name = bot_name
        self.allow_message_content = allow_message_content
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._ids = itertools.count(1)
        self._base_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        self.bot_id = self.new_id()
        self.application_id = self.bot_id
        self.guilds: list[Guild] = []
        self._channels: dict[int, dict[str, Any]] = {}
        self._dms: dict[int, int] = {}
        self._messages: dict[int, dict[str, Any]] = {}  # every message, by id
        self._bot_messages: list[int] = []  # the bot's, in order
        self._deleted: set[int] = set()
        self._interactions: dict[str, Interaction] = {}
        self._sessions: dict[str, _Session] = {}
        self._sockets: list[web.WebSocketResponse] = []
        self._faults: list[_Fault] = []
        self._forbidden: set[int] = set()
        self._last_message: dict[str, Any] | None = None
        self._resume_ok = True
        self._changed = asyncio.Event()
        # what the bot did
        self.sent: list[dict[str, Any]] = []
        self.user_messages: list[dict[str, Any]] = []
        self.edits: list[Edit] = []
        self.deleted: list[int] = []
        self.typing: list[int] = []
        self.commands: list[dict[str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes = 0
        self.requests: list[tuple[str, str]] = []
        self.statuses: list[tuple[str, str, int]] = []
        self.threads_created: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # -- the world ---------------------------------------------------------------------

    def new_id(self) -> int:
        # consecutive values in the timestamp bits: consecutive guilds land on
        # alternating shards ((id >> 22) % shard_count)
        # a snowflake's top bits are its time (discord.py reads created_at from them,
        # e.g. to tell whether an interaction expired): now, plus one ms per id
        n = next(self._ids)
        return ((self._base_ms + n) << 22) | (n & 0xFFF)

    def _user(self, user_id: int, name: str, *, bot: bool = False) -> dict[str, Any]:
        return {
            "id": str(user_id),
            "username": name,
            "discriminator": "0",
            "global_name": name,
            "avatar": None,
            "bot": bot,
        }

    @property
    def bot_user(self) -> dict[str, Any]:
        return self._user(self.bot_id, self.bot_name, bot=True)

    def add_guild(self, name: str = "guild", *, channels: Sequence[str] = ("general",)) -> Guild:
        guild_id = self.new_id()
        if (guild_id >> 22) % 2 != len(self.guilds) % 2:
            guild_id = self.new_id()  # guilds alternate between shards (of two)
        guild = Guild(guild_id, name, {})
        for position, channel in enumerate(channels):
            channel_id = self.new_id()
            guild.channels[channel] = channel_id
            self._channels[channel_id] = {
                "id": str(channel_id),
                "type": 0,
                "guild_id": str(guild.id),
                "name": channel,
                "position": position,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
            }
        self.guilds.append(guild)
        return guild

    def add_thread(self, guild: Guild, parent_id: int, name: str = "thread") -> int:
        thread_id = self.new_id()
        data = self._thread(thread_id, guild.id, parent_id, name, owner_id=1)
        guild.threads.append(data)
        self._channels[thread_id] = data
        return thread_id

    def _thread(
        self, thread_id: int, guild_id: int, parent_id: int, name: str, *, owner_id: int
    ) -> dict[str, Any]:
        return {
            "id": str(thread_id),
            "type": 11,
            "guild_id": str(guild_id),
            "parent_id": str(parent_id),
            "name": name,
            "owner_id": str(owner_id),
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now(),
                "locked": False,
            },
        }

    def dm_channel(self, user_id: int) -> int:
        if user_id not in self._dms:
            channel_id = self.new_id()
            self._dms[user_id] = channel_id
            self._channels[channel_id] = {
                "id": str(channel_id),
                "type": 1,
                "recipients": [self._user(user_id, f"user{user_id}")],
                "last_message_id": None,
            }
        return self._dms[user_id]

    def _guild_of(self, channel_id: int) -> int | None:
        guild = self._channels.get(channel_id, {}).get("guild_id")
        return int(guild) if guild else None

    def _guild_create(self, guild: Guild) -> dict[str, Any]:
        member = {
            "user": self.bot_user,
            "roles": [],
            "joined_at": _now(),
            "deaf": False,
            "mute": False,
            "flags": 0,
        }
        return {
            "id": str(guild.id),
            "name": guild.name,
            "owner_id": "1",
            "unavailable": False,
            "member_count": 2,
            "large": False,
            "roles": [
                {
                    "id": str(guild.id),
                    "name": "@everyone",
                    "permissions": str((1 << 41) - 1),
                    "position": 0,
                    "color": 0,
                    "hoist": False,
                    "managed": False,
                    "mentionable": False,
                    "flags": 0,
                }
            ],
            "channels": [
                c
                for c in self._channels.values()
                if c.get("guild_id") == str(guild.id) and c["type"] == 0
            ],
            "threads": list(guild.threads),
            "members": [member],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "joined_at": _now(),
            "premium_tier": 0,
            "preferred_locale": "en-US",
        }

    # -- users act -----------------------------------------------------------------------

    async def user_message(
        self,
        channel_id: int,
        content: str,
        *,
        user_id: int = 501,
        username: str = "alice",
        guild_id: int | None = None,
        mention_bot: bool = False,
        reply_to: int | str | None = None,
        bot: bool = False,
        webhook_id: int | None = None,
        attachments: Sequence[dict[str, Any]] = (),
        sticker_items: Sequence[dict[str, Any]] = (),
        type: int = 0,
        message_id: int | None = None,
    ) -> dict[str, Any]:
        """A user posts a message; the bot's gateway gets MESSAGE_CREATE."""
        guild_id = guild_id if guild_id is not None else self._guild_of(channel_id)
        author = self._user(user_id, username, bot=bot)
        mentions = []
        if mention_bot:
            content = f"<@{self.bot_id}> {content}"
            mentions.append(self.bot_user)
        message = self._message(
            message_id or self.new_id(), channel_id, guild_id, author, content, type=type
        )
        message.update(
            mentions=mentions,
            attachments=list(attachments),
            sticker_items=list(sticker_items),
        )
        if webhook_id is not None:
            message["webhook_id"] = str(webhook_id)
        if reply_to is not None:
            referenced = self._messages.get(int(reply_to))
            message["type"] = 19 if type == 0 else type
            message["message_reference"] = {
                "type": 0,
                "message_id": str(reply_to),
                "channel_id": str(channel_id),
                **({"guild_id": str(guild_id)} if guild_id else {}),
            }
            message["referenced_message"] = referenced
            if referenced is not None and referenced["author"]["id"] == str(self.bot_id):
                message["mentions"].append(self.bot_user)
        self._messages[int(message["id"])] = message
        self.user_messages.append(message)
        self._last_message = message
        await self.dispatch("MESSAGE_CREATE", message, guild_id=guild_id)
        return message

    def _message(
        self,
        message_id: int,
        channel_id: int,
        guild_id: int | None,
        author: dict[str, Any],
        content: str,
        *,
        type: int = 0,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": type,
            "flags": 0,
            "components": [],
        }
        if guild_id is not None:
            message["guild_id"] = str(guild_id)
            message["member"] = {
                "roles": [],
                "joined_at": _now(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "nick": None,
            }
        return message

    async def user_edit(self, message_id: int, content: str) -> dict[str, Any]:
        message = self._messages[message_id]
        message.update(content=content, edited_timestamp=_now())
        await self.dispatch(
            "MESSAGE_UPDATE", message, guild_id=self._guild_of(int(message["channel_id"]))
        )
        return message

    async def user_delete(self, message_id: int) -> None:
        message = self._messages[message_id]
        channel_id = int(message["channel_id"])
        guild_id = self._guild_of(channel_id)
        data = {"id": str(message_id), "channel_id": str(channel_id)}
        if guild_id:
            data["guild_id"] = str(guild_id)
        await self.dispatch("MESSAGE_DELETE", data, guild_id=guild_id)

    async def slash_command(
        self,
        name: str,
        channel_id: int,
        *,
        user_id: int = 501,
        username: str = "alice",
        options: dict[str, str] | None = None,
    ) -> Interaction:
        """A user invokes a slash command; the bot's gateway gets INTERACTION_CREATE."""
        guild_id = self._guild_of(channel_id)
        interaction = Interaction(self.new_id(), f"itoken{self.new_id()}", channel_id)
        self._interactions[interaction.token] = interaction
        channel = self._channels[channel_id]
        data: dict[str, Any] = {
            "id": str(interaction.id),
            "application_id": str(self.application_id),
            "type": 2,
            "token": interaction.token,
            "version": 1,
            "channel_id": str(channel_id),
            "channel": {"id": str(channel_id), "type": channel["type"]},
            "attachment_size_limit": 8_000_000,
            "locale": "en-US",
            "app_permissions": str((1 << 41) - 1),
            "data": {
                "id": str(self.new_id()),
                "name": name,
                "type": 1,
                "options": [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()],
            },
        }
        user = self._user(user_id, username)
        if guild_id is not None:
            data["guild_id"] = str(guild_id)
            data["member"] = {
                "user": user,
                "roles": [],
                "joined_at": _now(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": str((1 << 41) - 1),
            }
        else:
            data["user"] = user
        await self.dispatch("INTERACTION_CREATE", data, guild_id=guild_id)
        return interaction

    async def dispatch(
        self, event: str, data: dict[str, Any], *, guild_id: int | None = None
    ) -> None:
        """Send a gateway event to every session whose shard has ``guild_id`` (DMs: 0)."""
        for session in list(self._sessions.values()):
            shard_id, count = session.shard
            wanted = 0 if guild_id is None else (guild_id >> 22) % count
            if shard_id != wanted:
                continue
            session.seq += 1
            payload = {"op": 0, "t": event, "s": session.seq, "d": data}
            session.history.append(payload)
            if session.ws is not None and not session.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await session.ws.send_str(json.dumps(payload))
        self._notify()

    async def redeliver_last(self) -> None:
        """Send the last user message again (a repeated event, new sequence number)."""
        assert self._last_message is not None
        message = self._last_message
        await self.dispatch(
            "MESSAGE_CREATE", message, guild_id=self._guild_of(int(message["channel_id"]))
        )

    async def force_reconnect(self, *, resume: bool = True) -> None:
        """Ask the bot to reconnect (op 7); with ``resume=False`` its RESUME is refused."""
        self._resume_ok = resume
        for ws in list(self._sockets):
            if not ws.closed:
                await ws.send_str(json.dumps({"op": 7, "d": None}))

    async def disconnect(self) -> None:
        """Drop every gateway connection abruptly."""
        for ws in list(self._sockets):
            await ws.close(code=4000)

    # -- faults --------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int = 429,
        retry_after: float = 0.1,
        times: int = 1,
        code: int | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests (path after /api/v10) with ``status``."""
        self._faults.append(
            _Fault(method, re.compile(path_pattern), status, retry_after, times, code, message)
        )

    def forbid(self, channel_id: int) -> None:
        """The bot may not post in this channel (403, code 50013)."""
        self._forbidden.add(channel_id)

    # -- what the bot did ------------------------------------------------------------------

    def messages(self, channel_id: int) -> list[dict[str, Any]]:
        """The bot's messages in the channel as they are now (edited, not deleted)."""
        return [
            self._messages[i]
            for i in self._bot_messages
            if i not in self._deleted and self._messages[i]["channel_id"] == str(channel_id)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds (checked whenever the bot does something)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                shown = [self._messages[i]["content"][:60] for i in self._bot_messages[-10:]]
                raise TimeoutError(
                    f"condition not met within {timeout} s; requests: {self.requests[-15:]}, "
                    f"bot messages: {shown}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def _notify(self) -> None:
        self._changed.set()

    # -- gateway ---------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        session: _Session | None = None
        await ws.send_str(
            json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        )
        try:
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(frame.data)
                op, data = payload.get("op"), payload.get("d")
                if op == 1:
                    await ws.send_str(json.dumps({"op": 11}))
                elif op == 2:
                    session = await self._identify(ws, data)
                    if session is None:
                        break
                elif op == 6:
                    session = await self._resume(ws, data)
                self._notify()
        finally:
            if session is not None and session.ws is ws:
                session.ws = None
            self._sockets.remove(ws)
            self._notify()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> _Session | None:
        self.identifies.append(data)
        if data.get("token") not in (self.token, f"Bot {self.token}"):
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if data.get("intents", 0) & MESSAGE_CONTENT and not self.allow_message_content:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        shard = list(data.get("shard") or [0, 1])
        # a new session replaces the one of the same shard
        for old in [s for s in self._sessions.values() if s.shard == shard]:
            del self._sessions[old.id]
        session = _Session(f"session{self.new_id()}", shard)
        session.ws = ws
        self._sessions[session.id] = session
        owned = [g for g in self.guilds if (g.id >> 22) % shard[1] == shard[0]]
        ready = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [{"id": str(g.id), "unavailable": True} for g in owned],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "shard": shard,
            "application": {"id": str(self.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
        }
        await self._send_event(session, "READY", ready)
        for guild in owned:
            await self._send_event(session, "GUILD_CREATE", self._guild_create(guild))
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> _Session | None:
        self.resumes += 1
        session = self._sessions.get(data.get("session_id", ""))
        if session is None or not self._resume_ok or data.get("token") != self.token:
            self._resume_ok = True
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return None
        session.ws = ws
        after = int(data.get("seq") or 0)
        for payload in session.history:
            if payload["s"] > after:
                await ws.send_str(json.dumps(payload))
        await self._send_event(session, "RESUMED", {})
        return session

    async def _send_event(self, session: _Session, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        payload = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.history.append(payload)
        assert session.ws is not None
        await session.ws.send_str(json.dumps(payload))

    # -- REST ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        if request.path.startswith("/api/v10"):
            path = request.path.removeprefix("/api/v10")
            self.statuses.append((request.method, path, response.status))
            self._notify()
        return response

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        method, path = request.method, "/" + request.match_info["path"]
        self.requests.append((method, path))
        self._notify()
        if request.headers.get("Authorization") != f"Bot {self.token}" and not path.startswith(
            ("/webhooks/", "/interactions/")
        ):
            return _json({"message": "401: Unauthorized", "code": 0}, 401)
        for fault in self._faults:
            if fault.times > 0 and fault.method == method and fault.pattern.fullmatch(path):
                fault.times -= 1
                return _error(fault)
        body = await _body(request)
        for pattern, verb, handler in self._routes():
            match = re.fullmatch(pattern, path)
            if match and verb == method:
                result: web.StreamResponse = await handler(body, *match.groups())
                return result
        return _json({"message": "404: Not Found", "code": 0}, 404)

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            (r"/users/@me", "GET", self._get_me),
            (r"/oauth2/applications/@me", "GET", self._get_application),
            (r"/gateway", "GET", self._get_gateway),
            (r"/gateway/bot", "GET", self._get_gateway),
            (r"/users/@me/channels", "POST", self._create_dm),
            (r"/channels/(\d+)", "GET", self._get_channel),
            (r"/channels/(\d+)/messages", "POST", self._create_message),
            (r"/channels/(\d+)/messages/(\d+)", "GET", self._get_message),
            (r"/channels/(\d+)/messages/(\d+)", "PATCH", self._edit_message),
            (r"/channels/(\d+)/messages/(\d+)", "DELETE", self._delete_message),
            (r"/channels/(\d+)/messages/(\d+)/threads", "POST", self._start_thread),
            (r"/channels/(\d+)/typing", "POST", self._typing),
            (r"/applications/(\d+)/commands", "PUT", self._put_commands),
            (r"/applications/(\d+)/commands", "GET", self._get_commands),
            (r"/interactions/(\d+)/([^/]+)/callback", "POST", self._callback),
            (r"/webhooks/(\d+)/([^/]+)", "POST", self._followup),
            (r"/webhooks/(\d+)/([^/]+)/messages/([^/]+)", "PATCH", self._edit_followup),
            (r"/webhooks/(\d+)/([^/]+)/messages/([^/]+)", "DELETE", self._delete_followup),
        ]

    async def _get_me(self, _body: dict[str, Any]) -> web.Response:
        return _json(self.bot_user)

    async def _get_application(self, _body: dict[str, Any]) -> web.Response:
        return _json(
            {
                "id": str(self.application_id),
                "name": self.bot_name,
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self._user(1, "owner"),
                "verify_key": "0" * 64,
                "flags": 0,
                "summary": "",
                "team": None,
            }
        )

    async def _get_gateway(self, _body: dict[str, Any]) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 1000,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    async def _create_dm(self, body: dict[str, Any]) -> web.Response:
        return _json(self._channels[self.dm_channel(int(body["recipient_id"]))])

    async def _get_channel(self, _body: dict[str, Any], channel_id: str) -> web.Response:
        channel = self._channels.get(int(channel_id))
        if channel is None:
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        return _json(channel)

    def _post_bot_message(self, channel_id: int, body: dict[str, Any]) -> dict[str, Any]:
        message = self._message(
            self.new_id(), channel_id, self._guild_of(channel_id), self.bot_user, ""
        )
        message["content"] = body.get("content") or ""
        message["allowed_mentions"] = body.get("allowed_mentions")
        if body.get("message_reference"):
            message["message_reference"] = body["message_reference"]
            message["type"] = 19
        self._messages[int(message["id"])] = message
        self._bot_messages.append(int(message["id"]))
        self.sent.append(message)
        return message

    async def _create_message(self, body: dict[str, Any], channel_id: str) -> web.Response:
        if int(channel_id) not in self._channels:
            return _json({"message": "Unknown Channel", "code": 10003}, 404)
        if int(channel_id) in self._forbidden:
            return _json({"message": "Missing Permissions", "code": 50013}, 403)
        return _json(self._post_bot_message(int(channel_id), body))

    async def _get_message(
        self, _body: dict[str, Any], _channel_id: str, message_id: str
    ) -> web.Response:
        message = self._messages.get(int(message_id))
        if message is None or int(message_id) in self._deleted:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        return _json(message)

    def _edit(self, message_id: int, body: dict[str, Any]) -> web.Response:
        message = self._messages.get(message_id)
        if message is None or message_id in self._deleted:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if "content" in body:
            message["content"] = body["content"]
            message["edited_timestamp"] = _now()
            self.edits.append(Edit(message_id, body["content"], time.monotonic()))
        return _json(message)

    async def _edit_message(
        self, body: dict[str, Any], _channel_id: str, message_id: str
    ) -> web.Response:
        return self._edit(int(message_id), body)

    async def _delete_message(
        self, _body: dict[str, Any], _channel_id: str, message_id: str
    ) -> web.Response:
        self._deleted.add(int(message_id))
        self.deleted.append(int(message_id))
        return web.Response(status=204)

    async def _start_thread(
        self, body: dict[str, Any], channel_id: str, _message_id: str
    ) -> web.Response:
        guild_id = self._guild_of(int(channel_id))
        assert guild_id is not None
        thread_id = self.new_id()
        data = self._thread(
            thread_id, guild_id, int(channel_id), body.get("name", "thread"), owner_id=self.bot_id
        )
        self._channels[thread_id] = data
        for guild in self.guilds:
            if guild.id == guild_id:
                guild.threads.append(data)
        self.threads_created.append(data)
        await self.dispatch("THREAD_CREATE", {**data, "newly_created": True}, guild_id=guild_id)
        return _json(data)

    async def _typing(self, _body: dict[str, Any], channel_id: str) -> web.Response:
        self.typing.append(int(channel_id))
        return web.Response(status=204)

    async def _put_commands(self, body: Any, _app: str) -> web.Response:
        self.commands = [
            {
                **c,
                "id": str(self.new_id()),
                "application_id": str(self.application_id),
                "version": "1",
                "default_member_permissions": None,
                "dm_permission": True,
            }
            for c in body
        ]
        return _json(self.commands)

    async def _get_commands(self, _body: dict[str, Any], _app: str) -> web.Response:
        return _json(self.commands)

    async def _callback(
        self, body: dict[str, Any], interaction_id: str, token: str
    ) -> web.Response:
        interaction = self._interactions.get(token)
        if interaction is None or str(interaction.id) != interaction_id:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        interaction.callbacks.append(body)
        return _json(
            {
                "interaction": {
                    "id": interaction_id,
                    "type": 2,
                    "response_message_loading": body.get("type") == 5,
                    "response_message_ephemeral": False,
                }
            }
        )

    async def _followup(self, body: dict[str, Any], _app: str, token: str) -> web.Response:
        interaction = self._interactions.get(token)
        if interaction is None:
            return _json({"message": "Unknown Webhook", "code": 10015}, 404)
        message = self._post_bot_message(interaction.channel_id, body)
        message["webhook_id"] = str(self.application_id)
        interaction.followups.append(message)
        return _json(message)

    async def _edit_followup(
        self, body: dict[str, Any], _app: str, token: str, message_id: str
    ) -> web.Response:
        interaction = self._interactions.get(token)
        if interaction is None or not interaction.followups:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        target = interaction.followups[0]["id"] if message_id == "@original" else message_id
        return self._edit(int(target), body)

    async def _delete_followup(
        self, _body: dict[str, Any], _app: str, token: str, message_id: str
    ) -> web.Response:
        interaction = self._interactions.get(token)
        if interaction is not None:
            interaction.callbacks.append({"deleted": message_id})
        return web.Response(status=204)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        headers={"Content-Type": JSON, **(headers or {})},
    )


def _error(fault: _Fault) -> web.Response:
    if fault.status == 429:
        return _json(
            {
                "message": "You are being rate limited.",
                "retry_after": fault.retry_after,
                "global": False,
            },
            429,
            {
                "Retry-After": str(fault.retry_after),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset-After": str(fault.retry_after),
                "X-RateLimit-Bucket": "fakebucket",
                "X-RateLimit-Scope": "user",
            },
        )
    if fault.status >= 500:
        return web.Response(status=fault.status, text="server error")
    return _json({"message": fault.message or "error", "code": fault.code or 0}, fault.status)


async def _body(request: web.Request) -> Any:
    if request.method in ("GET", "DELETE") or not request.can_read_body:
        return {}
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        raw = form.get("payload_json")
        return json.loads(str(raw)) if raw else {}
    text = await request.text()
    return json.loads(text) if text else {}
