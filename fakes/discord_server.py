"""A fake Discord REST API and gateway on 127.0.0.1, for end-to-end tests with the real
discord.py (2.7).

Point discord.py at it (two class attributes, restored at the end of the ``with``)::

    async with FakeDiscord() as fake:
        with point_discord_py_at(fake):
            client = discord.Client(intents=intents, guild_ready_timeout=0.05)
            ...
            await client.start(fake.token)

The world is built with :meth:`FakeDiscord.add_guild`, :meth:`FakeDiscord.add_thread` and
:meth:`FakeDiscord.dm_channel`; users act with :meth:`FakeDiscord.user_message`,
:meth:`FakeDiscord.user_edit`, :meth:`FakeDiscord.user_delete` and
:meth:`FakeDiscord.slash_command`, which are dispatched over the gateway to the shard(s)
that own the guild (DMs go to shard 0). What the bot did is recorded: ``sent``,
:meth:`FakeDiscord.messages`, ``edits``, ``deleted``, ``typing``, ``commands``,
``threads_created``, ``identifies``, ``resumes``, ``calls`` (every REST request, with
``requests`` and ``statuses`` as tuples). Errors are injected with :meth:`FakeDiscord.fail`
and :meth:`FakeDiscord.forbid`; the gateway is broken with
:meth:`FakeDiscord.force_reconnect` and :meth:`FakeDiscord.disconnect`. Wait for anything
with :meth:`FakeDiscord.wait_for`, which is rechecked whenever a request or a gateway
message arrives.

The gateway keeps a session per IDENTIFY with its own sequence numbers and a log of what it
dispatched, so that a RESUME replays what the client missed; events dispatched while a
session has no connection (after a RECONNECT or a dropped socket) are kept for the resume.
Frames are plain JSON text: the client asks for zlib-stream compression but accepts
uncompressed text.

Snowflakes are strings in payloads and ints in the Python API (``Guild.id``, the channel ids
returned by ``dm_channel``...). Guild ids are handed out round-robin over shards: guild
number ``n`` lands on shard ``n % shard_count`` for any shard count from 1 to 8.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import math
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, hdrs, web

DISCORD_EPOCH = 1_420_070_400_000
"""Milliseconds of 2015-01-01, the epoch of snowflakes."""
DEFAULT_TOKEN = "test-token"
DEFAULT_BOT_ID = 1_100_000_000_000_000_001
DEFAULT_USER_ID = 1001
"""The user of user_message and slash_command when no user_id is given ("alice")."""
OWNER_ID = 1000
"""The owner of the application and of every guild."""
DEFAULT_HEARTBEAT_INTERVAL = 41_250
MAX_CONTENT_LENGTH = 2000

# gateway opcodes
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

# gateway close codes
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_SHARD = 4010
CLOSE_INVALID_INTENTS = 4013
CLOSE_DISALLOWED_INTENTS = 4014

# intents
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15

# error codes of the JSON error bodies
UNKNOWN_CHANNEL = 10003
UNKNOWN_GUILD = 10004
UNKNOWN_MEMBER = 10007
UNKNOWN_MESSAGE = 10008
UNKNOWN_USER = 10013
UNKNOWN_WEBHOOK = 10015
UNKNOWN_INTERACTION = 10062
MISSING_ACCESS = 50001
CANNOT_EDIT_OTHERS_MESSAGE = 50005
EMPTY_MESSAGE = 50006
MISSING_PERMISSIONS = 50013
INVALID_FORM_BODY = 50035
ALREADY_ACKNOWLEDGED = 40060
THREAD_ALREADY_CREATED = 160004

_MANAGE_AND_ADMIN = 1 << 3  # ADMINISTRATOR: left out, so that permissions stay meaningful
EVERYONE_PERMISSIONS = ((1 << 50) - 1) & ~_MANAGE_AND_ADMIN
"""What the @everyone role of every guild grants: everything but Administrator."""

_RECHECK = 0.05  # seconds between rechecks of wait_for predicates
_SHARD_SPREAD = 840  # lcm(1..8): guild n gets (id >> 22) % k == n % k for k in 1..8
_MENTION_RE = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")
_LOADING = 1 << 7  # message flag of a deferred interaction response
_EPHEMERAL = 1 << 6

_DEFAULT_ERRORS: dict[int, tuple[str, int]] = {
    400: ("Invalid Form Body", INVALID_FORM_BODY),
    401: ("401: Unauthorized", 0),
    403: ("Missing Permissions", MISSING_PERMISSIONS),
    404: ("404: Not Found", 0),
    405: ("405: Method Not Allowed", 0),
}

Handler = Callable[..., Any]


def snowflake_time_ms(snowflake: int) -> int:
    """Unix milliseconds encoded in a snowflake."""
    return (snowflake >> 22) + DISCORD_EPOCH


def shard_for(guild_id: int | None, shard_count: int) -> int:
    """The shard that receives a guild's events (DMs: shard 0)."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


def valid_text(text: str) -> str:
    """``text`` as Discord can carry it: lone surrogates become U+FFFD (a surrogate pair
    becomes its character)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


class ApiError(Exception):
    """An error answer of the REST API: ``{"message": ..., "code": ...}``."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        code: int | None = None,
        *,
        errors: dict[str, Any] | None = None,
    ) -> None:
        default_message, default_code = _DEFAULT_ERRORS.get(status, (f"{status}: Error", 0))
        self.status = status
        self.message = default_message if message is None else message
        self.code = default_code if code is None else code
        self.errors = errors
        super().__init__(f"{status} {self.message} (code {self.code})")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def _form_error(field_name: str, code: str, message: str) -> ApiError:
    errors = {field_name: {"_errors": [{"code": code, "message": message}]}}
    return ApiError(400, "Invalid Form Body", INVALID_FORM_BODY, errors=errors)


@dataclass
class Guild:
    """A guild of the fake world. ``channels`` and ``threads`` map names to ids; members
    (user_id -> member payload with ``user``) are added as they speak."""

    id: int
    name: str
    channels: dict[str, int] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    owner_id: int = OWNER_ID

    @property
    def everyone_role_id(self) -> int:
        return self.id

    def shard(self, shard_count: int) -> int:
        """The shard that owns this guild among ``shard_count``."""
        return shard_for(self.id, shard_count)


class Edit(tuple[int, str]):
    """``(message_id, content)`` of one successful PATCH of a bot message; ``at`` is its
    ``time.monotonic()`` (the clock of the event loop) and ``body`` the request body."""

    at: float
    body: dict[str, Any]

    def __new__(cls, message_id: int, content: str, *, at: float, body: dict[str, Any]) -> Edit:
        self = super().__new__(cls, (message_id, content))
        self.at = at
        self.body = body
        return self

    @property
    def message_id(self) -> int:
        return self[0]

    @property
    def content(self) -> str:
        return self[1]


@dataclass
class UploadedFile:
    """A file part of a multipart request."""

    name: str
    filename: str | None
    content_type: str
    content: bytes


@dataclass
class ApiCall:
    """One REST request. ``path`` is after ``/api/v10``, without the query; ``status`` is
    None while it is being answered; ``body`` is the JSON body (the ``payload_json`` part
    of a multipart one)."""

    method: str
    path: str
    query: dict[str, str]
    at: float
    body: Any = None
    files: list[UploadedFile] = field(default_factory=list)
    authorization: str | None = None
    status: int | None = None
    response: Any = None
    fault: bool = False
    """The answer was injected by fail() or forbid()."""


@dataclass
class Fault:
    """An injected error, see :meth:`FakeDiscord.fail`."""

    method: str
    pattern: re.Pattern[str]
    status: int
    retry_after: float
    times: int | None
    code: int | None
    message: str | None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method != "*" and self.method.upper() != method.upper():
            return False
        return self.pattern.fullmatch(path) is not None


@dataclass
class InteractionRecord:
    """A slash command sent with :meth:`FakeDiscord.slash_command` and what the bot answered.

    ``callbacks`` are the bodies POSTed to ``/interactions/{id}/{token}/callback``
    (``{"type": 4 or 5..., "data": {...}}``); ``followups`` the bodies of followup messages
    (with their ``id``); ``edits`` the bodies of PATCHes of ``@original``; ``original`` the
    original response message in its current state (None before a type 4/5 callback or
    after a DELETE)."""

    id: int
    token: str
    name: str
    channel_id: int
    guild_id: int | None
    user_id: int
    payload: dict[str, Any]
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    followups: list[dict[str, Any]] = field(default_factory=list)
    edits: list[dict[str, Any]] = field(default_factory=list)
    original: dict[str, Any] | None = None
    original_deleted: bool = False
    followup_messages: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def response_type(self) -> int | None:
        """The type of the first callback (4 message, 5 deferred...), None if none came."""
        return int(self.callbacks[0]["type"]) if self.callbacks else None

    @property
    def content(self) -> str | None:
        """The original response's current content."""
        return None if self.original is None else str(self.original.get("content", ""))


@dataclass
class _Close:
    code: int


@dataclass
class Session:
    """A gateway session, from IDENTIFY until it is invalidated."""

    id: str
    shard: tuple[int, int] | None
    intents: int
    identify: dict[str, Any]
    seq: int = 0
    log: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    connection: Connection | None = None
    invalid: bool = False
    refuse_resume: bool = False

    @property
    def shard_id(self) -> int:
        return 0 if self.shard is None else self.shard[0]

    @property
    def shard_count(self) -> int:
        return 1 if self.shard is None else self.shard[1]


@dataclass
class Connection:
    """One websocket connection to the gateway. ``sent`` holds every payload sent to the
    client, ``received`` every payload it sent."""

    number: int
    ws: web.WebSocketResponse
    request: web.Request
    path: str
    query: dict[str, str]
    opened_at: float
    session: Session | None = None
    ready: bool = False
    """READY or RESUMED was sent."""
    resumed: bool = False
    retiring: bool = False
    """RECONNECT was sent or the fake dropped it: the client is expected to leave."""
    closed: bool = False
    server_close_code: int | None = None
    client_close_code: int | None = None
    sent: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    outbox: asyncio.Queue[str | _Close | None] = field(default_factory=asyncio.Queue)
    writer: asyncio.Task[None] | None = None

    @property
    def shard(self) -> list[int] | None:
        if self.session is None or self.session.shard is None:
            return None
        return list(self.session.shard)

    @property
    def live(self) -> bool:
        return not self.closed and not self.ws.closed

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Dispatches sent on this connection (``{"op": 0, "t", "s", "d"}``), of one type."""
        return [p for p in self.sent if p.get("op") == 0 and (name is None or p["t"] == name)]


@dataclass
class DiscordPyPatch:
    """The discord.py endpoints replaced by :func:`point_discord_py_at`; ``restore()``
    (or the end of a ``with``) puts the originals back."""

    base: str
    gateway: Any

    def restore(self) -> None:
        route, websocket = _discord_classes()
        route.BASE = self.base
        websocket.DEFAULT_GATEWAY = self.gateway

    def __enter__(self) -> DiscordPyPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _discord_classes() -> tuple[Any, Any]:
    with warnings.catch_warnings():
        # discord.py imports audioop (voice), deprecated since Python 3.11
        warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
        from discord.gateway import DiscordWebSocket
        from discord.http import Route
    return Route, DiscordWebSocket


def point_discord_py_at(fake: FakeDiscord) -> DiscordPyPatch:
    """Sends discord.py's REST requests (``Route.BASE``, which interaction callbacks and
    webhooks use too) and gateway connections (``DiscordWebSocket.DEFAULT_GATEWAY``) to
    ``fake``. Usable as a context manager that restores the originals."""
    import yarl

    route, websocket = _discord_classes()
    patch = DiscordPyPatch(route.BASE, websocket.DEFAULT_GATEWAY)
    route.BASE = fake.api_url
    websocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    return patch


class FakeDiscord:
    """A fake Discord REST API and gateway. See the module docstring."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_id: int = DEFAULT_BOT_ID,
        bot_name: str = "turbobot",
        allow_message_content: bool = True,
        application_id: int | None = None,
        heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
        echo_own_messages: bool = True,
        recommended_shards: int = 1,
        ping_replies: bool = True,
    ) -> None:
        self.token = token
        self.bot_id = bot_id
        self.bot_name = bot_name
        self.application_id = bot_id if application_id is None else application_id
        self.allow_message_content = allow_message_content
        self.heartbeat_interval = heartbeat_interval
        """Milliseconds announced in HELLO."""
        self.echo_own_messages = echo_own_messages
        """Dispatch MESSAGE_CREATE/UPDATE/DELETE for the bot's own messages, as Discord does."""
        self.recommended_shards = recommended_shards
        """``shards`` of GET /gateway/bot (what AutoShardedClient uses without shard_count)."""
        self.ping_replies = ping_replies
        """A user's reply mentions the author of the message it answers (Discord's default)."""
        self.latency = 0.0
        """Seconds added to every REST request."""
        self.port = 0

        # the world
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, dict[str, Any]] = {}
        self.users: dict[int, dict[str, Any]] = {}
        self.dm_channels: dict[int, int] = {}
        """user id -> DM channel id."""
        self.files: dict[int, tuple[str, bytes]] = {}
        """attachment id -> (content type, bytes), served by GET /attachments/..."""

        # recorded
        self.calls: list[ApiCall] = []
        """Every REST request, in order of arrival (see also ``requests`` and ``statuses``)."""
        self.sent: list[dict[str, Any]] = []
        """Every message the bot created (POST /channels/{id}/messages), in order: the
        request body as discord.py sent it (so ``message_reference.message_id`` is an int)
        plus ``id`` and ``channel_id`` (strings) and ``files`` (UploadedFile) if any."""
        self.edits: list[Edit] = []
        """Each successful PATCH of a bot message: ``(message_id, content)`` with ``.at``."""
        self.deleted: list[int] = []
        """Ids of the messages the bot deleted."""
        self.typing: list[int] = []
        """Channel ids of POST /channels/{id}/typing, in order."""
        self.reactions: list[tuple[int, str]] = []
        """(message_id, emoji) of each reaction the bot added."""
        self.commands: list[dict[str, Any]] = []
        """The application commands of the last registration (a global or guild bulk PUT,
        or a POST), as answered (with ids)."""
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.threads_created: list[dict[str, Any]] = []
        self.identifies: list[dict[str, Any]] = []
        """The ``d`` of every IDENTIFY (token, intents, shard...), refused ones included."""
        self.resume_requests: list[dict[str, Any]] = []
        self.resumes = 0
        """RESUMEs accepted (answered with the missed events and RESUMED)."""
        self.invalid_sessions = 0
        """RESUMEs refused with op 9 INVALID_SESSION (d=false)."""
        self.heartbeats = 0
        self.connections: list[Connection] = []
        self.sessions: dict[str, Session] = {}
        self.user_messages: list[dict[str, Any]] = []
        """Every message dispatched by user_message, as dispatched."""
        self.interactions: list[InteractionRecord] = []
        self.unknown: list[tuple[str, str]] = []
        """(method, path) of requests the fake does not serve (answered 404, or 405 for a
        known path with another method)."""
        self.faults: list[Fault] = []
        self.forbidden: set[int] = set()

        self._messages: dict[int, dict[str, Any]] = {}
        self._removed: set[int] = set()
        self._bot_messages: dict[int, list[int]] = {}
        self._nonces: dict[tuple[int, str], int] = {}
        self._last_user_create: dict[str, Any] | None = None
        self._id_clock = int(time.time() * 1000) - DISCORD_EPOCH
        self._id_increment = itertools.count()
        self._connection_numbers = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._routes = self._build_routes()

        self.users[bot_id] = self._make_user(bot_id, bot_name, bot=True)
        self.users[OWNER_ID] = self._make_user(OWNER_ID, "owner")
        self.users[DEFAULT_USER_ID] = self._make_user(DEFAULT_USER_ID, "alice")

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        """The ``resume_gateway_url`` of READY: the same server, another path."""
        return f"ws://127.0.0.1:{self.port}/gateway-resume"

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/gateway-resume", self._gateway)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._download)
        app.router.add_route("*", "/api/v10{path:/.*}", self._rest)
        app.router.add_route("*", "/{path:.*}", self._elsewhere)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        for conn in self.connections:
            if conn.live:
                conn.retiring = True
                conn.outbox.put_nowait(_Close(1001))
        writers = [c.writer for c in self.connections if c.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- the world ---------------------------------------------------------------------

    @property
    def bot_user(self) -> dict[str, Any]:
        return dict(self.users[self.bot_id])

    def add_guild(self, name: str = "guild", *, channels: Sequence[str] = ("general",)) -> Guild:
        """A guild with text channels (type 0) named ``channels``, the bot as a member and
        an @everyone role granting :data:`EVERYONE_PERMISSIONS`. Dispatched (GUILD_CREATE)
        to the owning shard if it is connected."""
        guild = Guild(id=self._next_guild_id(), name=name)
        self.guilds[guild.id] = guild
        guild.members[self.bot_id] = self._member(self.bot_id, with_user=True)
        guild.members[OWNER_ID] = self._member(OWNER_ID, with_user=True)
        for position, channel_name in enumerate(channels):
            channel_id = self._next_id()
            guild.channels[channel_name] = channel_id
            self.channels[channel_id] = {
                "id": str(channel_id),
                "type": 0,
                "guild_id": str(guild.id),
                "name": channel_name,
                "position": position,
                "permission_overwrites": [],
                "parent_id": None,
                "topic": None,
                "nsfw": False,
                "last_message_id": None,
                "rate_limit_per_user": 0,
                "flags": 0,
            }
        for session in self._sessions_for(guild.id, None):
            if session.intents & INTENT_GUILDS:
                self._emit(session, "GUILD_CREATE", self._guild_create(guild))
        self._notify()
        return guild

    def add_thread(self, guild: Guild | int, parent_channel_id: int, name: str = "thread") -> int:
        """A public thread (type 11) in a channel of ``guild``; dispatches THREAD_CREATE to
        the owning shard if it is connected. Returns the thread's id, a channel of its own."""
        guild_obj = self._guild(guild)
        thread_id = self._next_id()
        thread = self._thread_payload(thread_id, guild_obj, parent_channel_id, name, OWNER_ID)
        self.channels[thread_id] = thread
        guild_obj.threads[name] = thread_id
        for session in self._sessions_for(guild_obj.id, None):
            if session.intents & INTENT_GUILDS:
                self._emit(session, "THREAD_CREATE", {**thread, "newly_created": True})
        self._notify()
        return thread_id

    def dm_channel(self, user_id: int) -> int:
        """The id of the DM channel between the bot and ``user_id``, created on demand
        (POST /users/@me/channels answers the same)."""
        existing = self.dm_channels.get(user_id)
        if existing is not None:
            return existing
        self._ensure_user(user_id, None)
        channel_id = self._next_id()
        self.dm_channels[user_id] = channel_id
        self.channels[channel_id] = {
            "id": str(channel_id),
            "type": 1,
            "recipients": [dict(self.users[user_id])],
            "last_message_id": None,
            "flags": 0,
        }
        return channel_id

    def make_attachment(
        self,
        filename: str,
        content: bytes,
        *,
        content_type: str = "application/octet-stream",
        channel_id: int = 0,
    ) -> dict[str, Any]:
        """An attachment dict for ``user_message(attachments=...)`` whose ``url`` serves
        ``content`` from the fake (so ``Attachment.read()`` works)."""
        attachment_id = self._next_id()
        self.files[attachment_id] = (content_type, content)
        url = f"{self.url}/attachments/{channel_id}/{attachment_id}/{filename}"
        return {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(content),
            "url": url,
            "proxy_url": url,
            "content_type": content_type,
        }

    def message(self, message_id: int | str) -> dict[str, Any]:
        """Any message (user's or bot's) in its current state; KeyError if unknown."""
        return copy.deepcopy(self._messages[int(message_id)])

    # -- what the bot did --------------------------------------------------------------

    def messages(self, channel_id: int) -> list[dict[str, Any]]:
        """The bot's messages in a channel (message objects as Discord returns them, with
        string ids) in their current state, without the deleted ones, oldest first.
        Interaction responses are not included: see :class:`InteractionRecord`."""
        return [
            copy.deepcopy(self._messages[mid])
            for mid in self._bot_messages.get(channel_id, [])
            if mid not in self._removed
        ]

    def texts(self, channel_id: int) -> list[str]:
        """The contents of :meth:`messages`."""
        return [str(m["content"]) for m in self.messages(channel_id)]

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every REST request, in order of arrival."""
        return [(c.method, c.path) for c in self.calls]

    @property
    def statuses(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every answered REST request."""
        return [(c.method, c.path, c.status) for c in self.calls if c.status is not None]

    def calls_to(self, method: str, path_pattern: str) -> list[ApiCall]:
        """The REST calls whose method and path (a regex, matched in full) match."""
        pattern = re.compile(path_pattern)
        return [
            c
            for c in self.calls
            if (method == "*" or c.method == method.upper()) and pattern.fullmatch(c.path)
        ]

    def live_connections(self) -> list[Connection]:
        """Open connections that have a session (READY or RESUMED) and were not asked to
        leave."""
        return [c for c in self.connections if c.live and c.ready and not c.retiring]

    # -- waiting -----------------------------------------------------------------------

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 10,  # noqa: ASYNC109
    ) -> None:
        """Waits until ``predicate()`` holds. It is rechecked whenever a REST request or a
        gateway message arrives or is answered, and at least every 50 ms (for predicates on
        the client's side); TimeoutError describes what was recorded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s\n{self.describe()}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, _RECHECK))

    async def wait_connected(
        self,
        n_connections: int = 1,
        timeout: float = 10,  # noqa: ASYNC109
    ) -> None:
        """Waits until ``n_connections`` connections are identified or resumed and not
        asked to leave (after force_reconnect or disconnect: until the client is back)."""
        await self.wait_for(lambda: len(self.live_connections()) >= n_connections, timeout)

    def describe(self) -> str:
        """A readable summary of what was recorded (used by wait_for's TimeoutError)."""
        lines = ["FakeDiscord recorded:"]
        conns = [
            f"#{c.number} shard={c.shard} ready={c.ready} retiring={c.retiring} "
            f"closed={c.closed} close={c.server_close_code or c.client_close_code}"
            for c in self.connections
        ]
        lines.append(f"  connections: {conns or 'none'}")
        lines.append(
            f"  identifies: {[i.get('shard') for i in self.identifies]} "
            f"(intents {[i.get('intents') for i in self.identifies]}), resumes: {self.resumes}, "
            f"invalid sessions: {self.invalid_sessions}"
        )
        lines.append("  REST requests (last 25):")
        for call in self.calls[-25:]:
            lines.append(f"    {call.method} {call.path} -> {call.status}")
        if self.unknown:
            lines.append(f"  unknown routes: {self.unknown}")
        by_channel: dict[int, list[str]] = {}
        for mid in itertools.chain.from_iterable(self._bot_messages.values()):
            if mid not in self._removed:
                message = self._messages[mid]
                by_channel.setdefault(int(message["channel_id"]), []).append(
                    _short(str(message["content"]))
                )
        lines.append(f"  bot messages: {by_channel or 'none'}")
        lines.append(f"  edits: {len(self.edits)}, deleted: {self.deleted}, typing: {self.typing}")
        lines.append(f"  user messages: {[_short(m['content']) for m in self.user_messages]}")
        for record in self.interactions:
            lines.append(
                f"  interaction /{record.name}: callbacks "
                f"{[c.get('type') for c in record.callbacks]}, "
                f"followups {[_short(str(f.get('content'))) for f in record.followups]}"
            )
        if self.commands:
            lines.append(f"  commands: {[c['name'] for c in self.commands]}")
        return "\n".join(lines)

    # -- faults ------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int = 429,
        retry_after: float = 0.1,
        times: int | None = 1,
        code: int | None = None,
        message: str | None = None,
    ) -> Fault:
        """The next ``times`` requests (None: all) whose method (``"*"`` for any) and path
        after ``/api/v10`` (``path_pattern``, a regex matched in full) match answer
        ``status``.

        429 answers as Discord does: ``{"message": "You are being rate limited.",
        "retry_after": retry_after, "global": false}`` with Retry-After, X-RateLimit-*
        (scope "user") and Via headers; 4xx answer ``{"message", "code"}`` (403 defaults to
        50013 Missing Permissions); 5xx answer plain text.
        """
        fault = Fault(method, re.compile(path_pattern), status, retry_after, times, code, message)
        self.faults.append(fault)
        return fault

    def forbid(self, channel_id: int) -> None:
        """Every POST of a message to the channel answers 403 Missing Permissions (50013)."""
        self.forbidden.add(channel_id)

    # -- user activity -------------------------------------------------------------------

    async def user_message(
        self,
        channel_id: int,
        content: str,
        *,
        user_id: int = DEFAULT_USER_ID,
        username: str | None = None,
        guild_id: int | None = None,
        mention_bot: bool = False,
        reply_to: int | str | None = None,
        bot: bool = False,
        webhook_id: int | None = None,
        attachments: Sequence[Mapping[str, Any]] = (),
        sticker_items: Sequence[Mapping[str, Any]] = (),
        embeds: Sequence[Mapping[str, Any]] = (),
        type: int = 0,
        message_id: int | None = None,
    ) -> dict[str, Any]:
        """A user posts a message: MESSAGE_CREATE to the shard(s) owning the channel's guild
        (DMs: shard 0). Returns the message as dispatched (string ids). Lone surrogates in
        ``content`` become U+FFFD: they cannot travel in UTF-8.

        ``username`` defaults to the name the user had before ("alice" for the default
        user, ``user<ID>`` for a new one). ``mention_bot`` prefixes ``<@BOT_ID> `` to the
        content; every ``<@id>`` of a known user is a mention. ``reply_to`` (any message id)
        fills message_reference and referenced_message, makes the type 19 and, as the
        Discord client does by default, mentions the replied-to author. ``message_id``
        reuses an id (a duplicate).
        """
        channel = self._channel(channel_id)
        if guild_id is None and "guild_id" in channel:
            guild_id = int(channel["guild_id"])
        author = self._ensure_user(user_id, username, bot=bot)
        content = valid_text(content)
        if mention_bot:
            content = f"<@{self.bot_id}> {content}" if content else f"<@{self.bot_id}>"
        mid = self._next_id() if message_id is None else message_id
        message = self._build_message(
            mid,
            channel_id,
            guild_id,
            author,
            content,
            type_=19 if reply_to is not None and type == 0 else type,
            attachments=[self._attachment(a) for a in attachments],
            embeds=[dict(e) for e in embeds],
            sticker_items=[dict(s) for s in sticker_items],
            webhook_id=webhook_id,
            reply_to=reply_to,
            ping_reply=self.ping_replies,
        )
        if guild_id is not None and webhook_id is None:
            self._guild(guild_id).members.setdefault(user_id, self._member(user_id, with_user=True))
        self._messages[mid] = message
        self._removed.discard(mid)
        self.user_messages.append(copy.deepcopy(message))
        self._last_user_create = copy.deepcopy(message)
        self._dispatch_to_guild("MESSAGE_CREATE", message, guild_id)
        await self._drain()
        return copy.deepcopy(message)

    async def user_edit(self, message_id: int | str, content: str) -> dict[str, Any]:
        """The author edits a message: MESSAGE_UPDATE with the whole message."""
        message = self._messages[int(message_id)]
        message["content"] = content = valid_text(content)
        message["edited_timestamp"] = _now_iso()
        message["mentions"], message["mention_roles"] = self._mentions(
            content, self._guild_id_of(message), []
        )
        self._dispatch_to_guild("MESSAGE_UPDATE", message, self._guild_id_of(message))
        await self._drain()
        return copy.deepcopy(message)

    async def user_delete(self, message_id: int | str) -> None:
        """The author deletes a message: MESSAGE_DELETE."""
        message = self._messages[int(message_id)]
        self._removed.add(int(message_id))
        self._dispatch_to_guild(
            "MESSAGE_DELETE", _delete_event(message), self._guild_id_of(message)
        )
        await self._drain()

    async def slash_command(
        self,
        name: str,
        channel_id: int,
        *,
        user_id: int = DEFAULT_USER_ID,
        username: str | None = None,
        guild_id: int | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> InteractionRecord:
        """A user invokes the slash command ``name`` in a channel: INTERACTION_CREATE
        (type 2, data ``{id, name, type: 1, options}``; ``data.guild_id`` when the command
        was registered for the guild). Option types come from the registered command, else
        from the Python values (str 3, int 4, bool 5, float 10). Returns the record that
        collects the bot's responses."""
        channel = self._channel(channel_id)
        if guild_id is None and "guild_id" in channel:
            guild_id = int(channel["guild_id"])
        user = self._ensure_user(user_id, username)
        command, scoped = self._find_command(name, guild_id)
        interaction_id = self._next_id()
        token = f"interaction-{interaction_id}-{secrets.token_hex(8)}"
        data: dict[str, Any] = {
            "id": command["id"] if command else str(self._next_id()),
            "name": name,
            "type": 1,
            "options": _command_options(options or {}, command),
        }
        if scoped and guild_id is not None:
            data["guild_id"] = str(guild_id)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": 2,
            "data": data,
            "channel_id": str(channel_id),
            "channel": copy.deepcopy(channel),
            "token": token,
            "version": 1,
            "app_permissions": str(EVERYONE_PERMISSIONS),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": 26_214_400,
        }
        if guild_id is not None:
            guild = self._guild(guild_id)
            guild.members.setdefault(user_id, self._member(user_id, with_user=True))
            payload["guild_id"] = str(guild_id)
            payload["guild_locale"] = "en-US"
            payload["guild"] = {"id": str(guild_id), "locale": "en-US", "features": []}
            payload["member"] = {
                **self._member(user_id, with_user=True),
                "permissions": str(EVERYONE_PERMISSIONS),
            }
            payload["authorizing_integration_owners"] = {"0": str(guild_id)}
            payload["context"] = 0
        else:
            payload["user"] = user
            payload["authorizing_integration_owners"] = {"1": str(user_id)}
            payload["context"] = 1
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            name=name,
            channel_id=channel_id,
            guild_id=guild_id,
            user_id=user_id,
            payload=payload,
        )
        self.interactions.append(record)
        self._dispatch_to_guild("INTERACTION_CREATE", payload, guild_id)
        await self._drain()
        return record

    async def dispatch(self, event: str, data: dict[str, Any], *, shard: int | None = None) -> None:
        """Sends a raw dispatch: to the sessions of ``shard`` if given, else to those owning
        ``data["guild_id"]`` (shard 0 without one). No intent filtering."""
        guild_id = int(data["guild_id"]) if data.get("guild_id") is not None else None
        for session in self._sessions_for(guild_id, shard):
            self._emit(session, event, data)
        await self._drain()

    async def redeliver_last(self) -> None:
        """Dispatches the last user MESSAGE_CREATE again, with a new sequence number: the
        duplicate delivery a client may see around a resume."""
        if self._last_user_create is None:
            raise RuntimeError("no user message was dispatched yet")
        message = copy.deepcopy(self._last_user_create)
        self._dispatch_to_guild("MESSAGE_CREATE", message, self._guild_id_of(message))
        await self._drain()

    async def force_reconnect(self, *, resume: bool = True, shard: int | None = None) -> None:
        """Sends op 7 RECONNECT on the live connections (of one shard). The client
        reconnects and RESUMEs: with ``resume`` it gets the events it missed and RESUMED,
        else op 9 INVALID_SESSION (d=false) and it IDENTIFYs again. Events dispatched
        meanwhile are kept for the resume. ``await wait_connected()`` waits until it is
        back."""
        for conn in self.live_connections():
            session = conn.session
            if session is None or (shard is not None and session.shard_id != shard):
                continue
            conn.retiring = True
            session.refuse_resume = not resume
            session.connection = None
            self._send(conn, {"op": OP_RECONNECT, "d": None})
        await self._drain()
        self._notify()

    async def disconnect(self, code: int = 1006, *, shard: int | None = None) -> None:
        """Drops the live connections (of one shard). 1006 closes the TCP connection
        without a close frame; another code is sent in a close frame (4000: the client
        resumes; 4004, 4010-4014: it gives up)."""
        for conn in list(self.connections):
            session = conn.session
            if not conn.live or (
                shard is not None and (session is None or session.shard_id != shard)
            ):
                continue
            conn.retiring = True
            if session is not None and session.connection is conn:
                session.connection = None
            if code == 1006:
                transport = conn.request.transport
                if transport is not None:
                    transport.abort()
            else:
                conn.outbox.put_nowait(_Close(code))
        await self._drain()
        self._notify()

    # -- gateway -----------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0)
        await ws.prepare(request)
        conn = Connection(
            number=next(self._connection_numbers),
            ws=ws,
            request=request,
            path=request.path,
            query=dict(request.query),
            opened_at=time.monotonic(),
        )
        conn.writer = asyncio.create_task(self._write(conn))
        self.connections.append(conn)
        self._send(
            conn,
            {
                "op": OP_HELLO,
                "d": {"heartbeat_interval": self.heartbeat_interval, "_trace": ["fake-gateway"]},
            },
        )
        self._notify()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                    except ValueError:
                        conn.outbox.put_nowait(_Close(CLOSE_DECODE_ERROR))
                        continue
                    conn.received.append(payload)
                    self._on_gateway(conn, payload)
                    self._notify()
                elif msg.type is WSMsgType.BINARY:
                    conn.outbox.put_nowait(_Close(CLOSE_DECODE_ERROR))
        finally:
            conn.closed = True
            conn.client_close_code = ws.close_code
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                if conn.server_close_code is None and ws.close_code == 1000:
                    session.invalid = True  # a clean close by the client ends the session
            conn.outbox.put_nowait(None)
            writer = conn.writer
            if writer is not None:
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(writer), 2)
                writer.cancel()
            while not conn.outbox.empty():
                conn.outbox.get_nowait()
                conn.outbox.task_done()
            self._notify()
        return ws

    async def _write(self, conn: Connection) -> None:
        while True:
            item = await conn.outbox.get()
            try:
                if item is None:
                    return
                if isinstance(item, _Close):
                    if conn.server_close_code is None and not conn.ws.closed:
                        conn.server_close_code = item.code
                        await conn.ws.close(code=item.code)
                elif not conn.ws.closed:
                    await conn.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                pass  # the client went away meanwhile
            finally:
                conn.outbox.task_done()
                self._notify()

    def _send(self, conn: Connection, payload: dict[str, Any]) -> None:
        conn.sent.append(payload)
        # UTF-8 frames cannot carry lone surrogates (and discord.py's orjson refuses them)
        conn.outbox.put_nowait(valid_text(json.dumps(payload, ensure_ascii=False)))

    async def _drain(self) -> None:
        for conn in list(self.connections):
            if not conn.closed:
                await conn.outbox.join()

    def _on_gateway(self, conn: Connection, payload: dict[str, Any]) -> None:
        op = payload.get("op")
        data = payload.get("d")
        if op == OP_HEARTBEAT:
            self.heartbeats += 1
            self._send(conn, {"op": OP_HEARTBEAT_ACK, "d": None})
        elif op == OP_IDENTIFY:
            self._identify(conn, data if isinstance(data, dict) else {})
        elif op == OP_RESUME:
            self._resume(conn, data if isinstance(data, dict) else {})
        elif op == OP_REQUEST_GUILD_MEMBERS and isinstance(data, dict):
            self._members_chunk(conn, data)
        elif op in (OP_PRESENCE_UPDATE, OP_VOICE_STATE_UPDATE):
            if conn.session is None:
                conn.outbox.put_nowait(_Close(CLOSE_NOT_AUTHENTICATED))
        else:
            conn.outbox.put_nowait(_Close(CLOSE_UNKNOWN_OPCODE))

    def _identify(self, conn: Connection, data: dict[str, Any]) -> None:
        self.identifies.append(data)
        if conn.session is not None:
            conn.outbox.put_nowait(_Close(CLOSE_ALREADY_AUTHENTICATED))
            return
        if data.get("token") != self.token:
            conn.outbox.put_nowait(_Close(CLOSE_AUTHENTICATION_FAILED))
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents >= 1 << 26:
            conn.outbox.put_nowait(_Close(CLOSE_INVALID_INTENTS))
            return
        if intents & INTENT_MESSAGE_CONTENT and not self.allow_message_content:
            conn.outbox.put_nowait(_Close(CLOSE_DISALLOWED_INTENTS))
            return
        shard: tuple[int, int] | None = None
        raw_shard = data.get("shard")
        if raw_shard is not None:
            if (
                not isinstance(raw_shard, list)
                or len(raw_shard) != 2
                or not 0 <= raw_shard[0] < raw_shard[1]
            ):
                conn.outbox.put_nowait(_Close(CLOSE_INVALID_SHARD))
                return
            shard = (int(raw_shard[0]), int(raw_shard[1]))
        # a new session for a shard supersedes the old ones that lost their connection
        for old in self.sessions.values():
            if old.shard == shard and old.connection is None:
                old.invalid = True
        session = Session(
            id=secrets.token_hex(16), shard=shard, intents=intents, identify=data, connection=conn
        )
        self.sessions[session.id] = session
        conn.session = session
        guilds = [
            g for g in self.guilds.values() if g.shard(session.shard_count) == session.shard_id
        ]
        ready: dict[str, Any] = {
            "v": 10,
            "user": {**self.users[self.bot_id], "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_gateway_url,
            "application": {"id": str(self.application_id), "flags": self._application_flags()},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "auth": {},
            "_trace": ["fake-gateway"],
        }
        if shard is not None:
            ready["shard"] = list(shard)
        self._emit(session, "READY", ready)
        if intents & INTENT_GUILDS:
            for guild in guilds:
                self._emit(session, "GUILD_CREATE", self._guild_create(guild))
        conn.ready = True

    def _resume(self, conn: Connection, data: dict[str, Any]) -> None:
        self.resume_requests.append(data)
        session = self.sessions.get(str(data.get("session_id")))
        if data.get("token") != self.token:
            conn.outbox.put_nowait(_Close(CLOSE_AUTHENTICATION_FAILED))
            return
        if session is None or session.invalid or session.refuse_resume:
            if session is not None:
                session.invalid = True
                if session.connection is conn:
                    session.connection = None
            self.invalid_sessions += 1
            self._send(conn, {"op": OP_INVALID_SESSION, "d": False})
            return
        previous = session.connection
        if previous is not None and previous is not conn:
            previous.retiring = True
        session.connection = conn
        conn.session = session
        seq = data.get("seq")
        after = seq if isinstance(seq, int) else 0
        for logged_seq, payload in session.log:
            if logged_seq > after:
                self._send(conn, payload)
        self._emit(session, "RESUMED", {"_trace": ["fake-gateway"]})
        self.resumes += 1
        conn.resumed = True
        conn.ready = True

    def _members_chunk(self, conn: Connection, data: dict[str, Any]) -> None:
        session = conn.session
        guild = self.guilds.get(int(data.get("guild_id") or 0))
        if session is None or guild is None:
            return
        members = list(guild.members.values())
        wanted = data.get("user_ids")
        if wanted:
            ids = {int(u) for u in (wanted if isinstance(wanted, list) else [wanted])}
            members = [m for m in members if int(m["user"]["id"]) in ids]
        query = data.get("query")
        if query:
            members = [m for m in members if m["user"]["username"].startswith(query)]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": copy.deepcopy(members),
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._emit(session, "GUILD_MEMBERS_CHUNK", chunk)

    def _emit(self, session: Session, event: str, data: dict[str, Any]) -> None:
        """Assigns the session's next sequence number, logs and sends (if connected)."""
        session.seq += 1
        payload = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.log.append((session.seq, payload))
        conn = session.connection
        if conn is not None and conn.live:
            self._send(conn, payload)

    def _sessions_for(self, guild_id: int | None, shard: int | None) -> list[Session]:
        targets = []
        for session in self.sessions.values():
            if session.invalid:
                continue
            if shard is not None:
                if session.shard_id != shard:
                    continue
            elif shard_for(guild_id, session.shard_count) != session.shard_id:
                continue
            targets.append(session)
        return targets

    def _dispatch_to_guild(self, event: str, data: dict[str, Any], guild_id: int | None) -> None:
        """Dispatches a user-side event, filtered and trimmed by each session's intents."""
        for session in self._sessions_for(guild_id, None):
            payload = data
            if event.startswith("MESSAGE_"):
                needed = INTENT_DIRECT_MESSAGES if guild_id is None else INTENT_GUILD_MESSAGES
                if not session.intents & needed:
                    continue
                if event != "MESSAGE_DELETE":
                    payload = self._trim_content(session, data, guild_id)
            self._emit(session, event, copy.deepcopy(payload))
        self._notify()

    def _trim_content(
        self, session: Session, message: dict[str, Any], guild_id: int | None
    ) -> dict[str, Any]:
        """Without the message content intent a bot sees no content of guild messages that
        neither mention it nor are its own."""
        if session.intents & INTENT_MESSAGE_CONTENT or guild_id is None:
            return message
        if int(message["author"]["id"]) == self.bot_id or any(
            int(m["id"]) == self.bot_id for m in message.get("mentions", [])
        ):
            return message
        return {**message, "content": "", "embeds": [], "attachments": [], "components": []}

    # -- REST --------------------------------------------------------------------------

    def _build_routes(self) -> list[tuple[str, re.Pattern[str], Handler, bool]]:
        snowflake = r"(?P<{}>\d+)"
        channel = snowflake.format("channel_id")
        message = snowflake.format("message_id")
        guild = snowflake.format("guild_id")
        app = snowflake.format("app_id")
        webhook = rf"/webhooks/{app}/(?P<token>[^/]+)"
        table: list[tuple[str, str, Handler, bool]] = [
            ("GET", "/gateway", self._get_gateway, False),
            ("GET", "/gateway/bot", self._get_gateway_bot, True),
            ("GET", "/users/@me", self._get_me, True),
            ("POST", "/users/@me/channels", self._create_dm, True),
            ("GET", rf"/users/{snowflake.format('user_id')}", self._get_user, True),
            ("GET", "/oauth2/applications/@me", self._get_application, True),
            ("GET", "/applications/@me", self._get_application, True),
            ("GET", rf"/channels/{channel}", self._get_channel, True),
            ("GET", rf"/channels/{channel}/messages", self._get_messages, True),
            ("POST", rf"/channels/{channel}/messages", self._create_message, True),
            ("GET", rf"/channels/{channel}/messages/{message}", self._get_message, True),
            ("PATCH", rf"/channels/{channel}/messages/{message}", self._edit_message, True),
            ("DELETE", rf"/channels/{channel}/messages/{message}", self._delete_message, True),
            ("POST", rf"/channels/{channel}/typing", self._typing, True),
            (
                "POST",
                rf"/channels/{channel}/messages/{message}/threads",
                self._thread_from_message,
                True,
            ),
            ("POST", rf"/channels/{channel}/threads", self._thread_without_message, True),
            (
                "PUT",
                rf"/channels/{channel}/messages/{message}/reactions/(?P<emoji>[^/]+)/@me",
                self._add_reaction,
                True,
            ),
            (
                "DELETE",
                rf"/channels/{channel}/messages/{message}/reactions/(?P<emoji>[^/]+)/@me",
                self._remove_reaction,
                True,
            ),
            ("GET", rf"/guilds/{guild}", self._get_guild, True),
            ("GET", rf"/guilds/{guild}/channels", self._get_guild_channels, True),
            (
                "GET",
                rf"/guilds/{guild}/members/{snowflake.format('user_id')}",
                self._get_member,
                True,
            ),
            ("GET", rf"/applications/{app}/commands", self._get_commands, True),
            ("PUT", rf"/applications/{app}/commands", self._put_commands, True),
            ("POST", rf"/applications/{app}/commands", self._post_command, True),
            (
                "DELETE",
                rf"/applications/{app}/commands/{snowflake.format('command_id')}",
                self._delete_command,
                True,
            ),
            ("GET", rf"/applications/{app}/guilds/{guild}/commands", self._get_commands, True),
            ("PUT", rf"/applications/{app}/guilds/{guild}/commands", self._put_commands, True),
            ("POST", rf"/applications/{app}/guilds/{guild}/commands", self._post_command, True),
            (
                "DELETE",
                rf"/applications/{app}/guilds/{guild}/commands/{snowflake.format('command_id')}",
                self._delete_command,
                True,
            ),
            (
                "POST",
                rf"/interactions/{snowflake.format('interaction_id')}/(?P<token>[^/]+)/callback",
                self._interaction_callback,
                False,
            ),
            ("GET", rf"{webhook}/messages/(?P<target>@original|\d+)", self._get_response, False),
            ("PATCH", rf"{webhook}/messages/(?P<target>@original|\d+)", self._edit_response, False),
            (
                "DELETE",
                rf"{webhook}/messages/(?P<target>@original|\d+)",
                self._delete_response,
                False,
            ),
            ("POST", webhook, self._followup, False),
        ]
        return [(m, re.compile(p), h, auth) for m, p, h, auth in table]

    def _match(self, method: str, path: str) -> tuple[Handler | None, dict[str, str], bool, bool]:
        """(handler, path parameters, needs authorization, path known for another method)."""
        path_known = False
        for route_method, pattern, handler, auth in self._routes:
            found = pattern.fullmatch(path)
            if found is None:
                continue
            if route_method == method:
                return handler, found.groupdict(), auth, True
            path_known = True
        return None, {}, True, path_known

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        call = ApiCall(
            request.method,
            request.match_info["path"],
            dict(request.query),
            time.monotonic(),
            authorization=request.headers.get(hdrs.AUTHORIZATION),
        )
        self.calls.append(call)
        self._notify()
        try:
            response = await self._answer(request, call)
        except ApiError as exc:
            call.status, call.response = exc.status, exc.body()
            response = _json(exc.body(), exc.status)
        self._notify()
        return response

    async def _answer(self, request: web.Request, call: ApiCall) -> web.Response:
        try:
            call.body, call.files = await _read_body(request)
        except ValueError as exc:
            raise ApiError(400, f"400: Bad Request ({exc})", 50109) from exc
        if self.latency:
            await asyncio.sleep(self.latency)
        handler, params, needs_auth, path_known = self._match(call.method, call.path)
        if needs_auth and call.authorization != f"Bot {self.token}":
            raise ApiError(401, "401: Unauthorized", 0)
        fault_response = self._inject_fault(call)
        if fault_response is not None:
            call.fault = True
            return fault_response
        if handler is None:
            self.unknown.append((call.method, call.path))
            if path_known:
                raise ApiError(405, "405: Method Not Allowed", 0)
            raise ApiError(404, "404: Not Found", 0)
        result = handler(call, **params)
        if asyncio.iscoroutine(result):
            result = await result
        if result is None:
            call.status = 204
            return web.Response(status=204, headers={"Via": "1.1 google"})
        call.status, call.response = 200, result
        return _json(result, 200)

    async def _elsewhere(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        self.unknown.append((request.method, path))
        self.calls.append(
            ApiCall(request.method, path, dict(request.query), time.monotonic(), status=404)
        )
        self._notify()
        return _json({"message": "404: Not Found", "code": 0}, 404)

    async def _download(self, request: web.Request) -> web.Response:
        stored = self.files.get(int(request.match_info["attachment_id"]))
        if stored is None:
            return web.Response(status=404, text="Not Found")
        content_type, content = stored
        return web.Response(body=content, headers={hdrs.CONTENT_TYPE: content_type})

    def _inject_fault(self, call: ApiCall) -> web.Response | None:
        forbidden = call.method == "POST" and re.fullmatch(r"/channels/(\d+)/messages", call.path)
        if forbidden and int(forbidden.group(1)) in self.forbidden:
            body = {"message": "Missing Permissions", "code": MISSING_PERMISSIONS}
            call.status, call.response = 403, body
            return _json(body, 403)
        for fault in self.faults:
            if not fault.matches(call.method, call.path):
                continue
            fault.hits += 1
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
            call.status = fault.status
            if fault.status == 429:
                body = {
                    "message": fault.message or "You are being rate limited.",
                    "retry_after": fault.retry_after,
                    "global": False,
                }
                if fault.code is not None:
                    body["code"] = fault.code
                call.response = body
                headers = {
                    "Retry-After": str(math.ceil(fault.retry_after)),
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": f"{time.time() + fault.retry_after:.3f}",
                    "X-RateLimit-Reset-After": f"{fault.retry_after:.3f}",
                    "X-RateLimit-Bucket": f"fake-{abs(hash(fault.pattern.pattern)) % 10**8:08d}",
                    "X-RateLimit-Scope": "user",
                }
                return _json(body, 429, headers)
            if fault.status >= 500:
                text = fault.message or "upstream connect error or disconnect/reset"
                call.response = text
                return web.Response(status=fault.status, text=text, headers={"Via": "1.1 google"})
            error = ApiError(fault.status, fault.message, fault.code)
            call.response = error.body()
            return _json(error.body(), fault.status)
        return None

    # -- REST handlers -------------------------------------------------------------------

    def _get_gateway(self, call: ApiCall) -> dict[str, Any]:
        return {"url": self.gateway_url}

    def _get_gateway_bot(self, call: ApiCall) -> dict[str, Any]:
        return {
            "url": self.gateway_url,
            "shards": self.recommended_shards,
            "session_start_limit": {
                "total": 1000,
                "remaining": max(0, 1000 - len(self.identifies)),
                "reset_after": 14_400_000,
                "max_concurrency": 1,
            },
        }

    def _get_me(self, call: ApiCall) -> dict[str, Any]:
        return {**self.users[self.bot_id], "verified": True, "mfa_enabled": False, "flags": 0}

    def _get_user(self, call: ApiCall, user_id: str) -> dict[str, Any]:
        user = self.users.get(int(user_id))
        if user is None:
            raise ApiError(404, "Unknown User", UNKNOWN_USER)
        return dict(user)

    def _create_dm(self, call: ApiCall) -> dict[str, Any]:
        body = call.body if isinstance(call.body, dict) else {}
        recipient = body.get("recipient_id")
        if recipient is None:
            raise _form_error("recipient_id", "BASE_TYPE_REQUIRED", "This field is required")
        return copy.deepcopy(self.channels[self.dm_channel(int(recipient))])

    def _application_flags(self) -> int:
        return 1 << 19 if self.allow_message_content else 0  # GATEWAY_MESSAGE_CONTENT_LIMITED

    def _get_application(self, call: ApiCall) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot_name,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "owner": dict(self.users[OWNER_ID]),
            "team": None,
            "flags": self._application_flags(),
            "rpc_origins": [],
            "interactions_endpoint_url": None,
            "bot": dict(self.users[self.bot_id]),
        }

    def _get_channel(self, call: ApiCall, channel_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._rest_channel(channel_id))

    def _get_messages(self, call: ApiCall, channel_id: str) -> list[dict[str, Any]]:
        self._rest_channel(channel_id)
        limit = min(100, int(call.query.get("limit", 50)))
        ids = sorted(
            mid
            for mid, m in self._messages.items()
            if m["channel_id"] == channel_id and mid not in self._removed
        )
        if "before" in call.query:
            ids = [i for i in ids if i < int(call.query["before"])]
        if "after" in call.query:
            ids = [i for i in ids if i > int(call.query["after"])][:limit]
        return [copy.deepcopy(self._messages[i]) for i in reversed(ids[-limit:])]

    def _get_message(self, call: ApiCall, channel_id: str, message_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._rest_message(channel_id, message_id))

    def _create_message(self, call: ApiCall, channel_id: str) -> dict[str, Any]:
        channel = self._rest_channel(channel_id)
        body = call.body if isinstance(call.body, dict) else {}
        guild_id = int(channel["guild_id"]) if "guild_id" in channel else None
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce"):
            existing = self._nonces.get((int(channel_id), str(nonce)))
            if existing is not None:
                return copy.deepcopy(self._messages[existing])
        content = body.get("content")
        content = "" if content is None else str(content)
        _check_content(content)
        attachments = self._uploaded_attachments(call, int(channel_id))
        sticker_ids = body.get("sticker_ids") or []
        if not (
            content
            or body.get("embeds")
            or attachments
            or sticker_ids
            or body.get("poll")
            or body.get("components")
        ):
            raise ApiError(400, "Cannot send an empty message", EMPTY_MESSAGE)
        reference = body.get("message_reference")
        reply_to: int | None = None
        if isinstance(reference, dict) and reference.get("message_id") is not None:
            reply_to = int(reference["message_id"])
            if reply_to not in self._messages or reply_to in self._removed:
                if reference.get("fail_if_not_exists", True):
                    raise _form_error(
                        "message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                    )
                reply_to = None
        message_id = self._next_id()
        message = self._build_message(
            message_id,
            int(channel_id),
            guild_id,
            dict(self.users[self.bot_id]),
            content,
            type_=19 if reply_to is not None else 0,
            attachments=attachments,
            embeds=list(body.get("embeds") or []),
            sticker_items=[
                {"id": str(s), "name": "sticker", "format_type": 1} for s in sticker_ids
            ],
            reply_to=reply_to,
            ping_reply=False,
        )
        message["flags"] = int(body.get("flags") or 0)
        message["components"] = list(body.get("components") or [])
        message["tts"] = bool(body.get("tts", False))
        if nonce is not None:
            message["nonce"] = nonce
            self._nonces[(int(channel_id), str(nonce))] = message_id
        self._messages[message_id] = message
        self._bot_messages.setdefault(int(channel_id), []).append(message_id)
        record = {**copy.deepcopy(body), "id": str(message_id), "channel_id": channel_id}
        if call.files:
            record["files"] = call.files
        self.sent.append(record)
        if self.echo_own_messages:
            self._dispatch_to_guild("MESSAGE_CREATE", message, guild_id)
        return copy.deepcopy(message)

    def _edit_message(self, call: ApiCall, channel_id: str, message_id: str) -> dict[str, Any]:
        message = self._rest_message(channel_id, message_id)
        if int(message["author"]["id"]) != self.bot_id:
            raise ApiError(
                403, "Cannot edit a message authored by another user", CANNOT_EDIT_OTHERS_MESSAGE
            )
        body = call.body if isinstance(call.body, dict) else {}
        if "content" in body:
            content = "" if body["content"] is None else str(body["content"])
            _check_content(content)
            message["content"] = content
        for key in ("embeds", "components"):
            if key in body:
                message[key] = list(body[key] or [])
        if "flags" in body and body["flags"] is not None:
            message["flags"] = int(body["flags"])
        if call.files or "attachments" in body:
            kept = {str(a.get("id")) for a in body.get("attachments") or []}
            message["attachments"] = [
                a for a in message["attachments"] if str(a["id"]) in kept
            ] + self._uploaded_attachments(call, int(channel_id))
        message["edited_timestamp"] = _now_iso()
        self.edits.append(
            Edit(int(message_id), str(message["content"]), at=call.at, body=copy.deepcopy(body))
        )
        if self.echo_own_messages:
            self._dispatch_to_guild("MESSAGE_UPDATE", message, self._guild_id_of(message))
        return copy.deepcopy(message)

    def _delete_message(self, call: ApiCall, channel_id: str, message_id: str) -> None:
        message = self._rest_message(channel_id, message_id)
        self._removed.add(int(message_id))
        self.deleted.append(int(message_id))
        if self.echo_own_messages or int(message["author"]["id"]) != self.bot_id:
            self._dispatch_to_guild(
                "MESSAGE_DELETE", _delete_event(message), self._guild_id_of(message)
            )

    def _typing(self, call: ApiCall, channel_id: str) -> None:
        self._rest_channel(channel_id)
        self.typing.append(int(channel_id))

    def _thread_from_message(
        self, call: ApiCall, channel_id: str, message_id: str
    ) -> dict[str, Any]:
        channel = self._rest_channel(channel_id)
        self._rest_message(channel_id, message_id)
        if "guild_id" not in channel or channel["type"] not in (0, 5):
            raise ApiError(400, "Cannot execute action on this channel type", 50024)
        if int(message_id) in self.channels:
            raise ApiError(
                400, "A thread has already been created for this message", THREAD_ALREADY_CREATED
            )
        body = call.body if isinstance(call.body, dict) else {}
        return self._open_thread(int(message_id), channel, body, 11)

    def _thread_without_message(self, call: ApiCall, channel_id: str) -> dict[str, Any]:
        channel = self._rest_channel(channel_id)
        if "guild_id" not in channel or channel["type"] not in (0, 5):
            raise ApiError(400, "Cannot execute action on this channel type", 50024)
        body = call.body if isinstance(call.body, dict) else {}
        return self._open_thread(self._next_id(), channel, body, int(body.get("type") or 11))

    def _open_thread(
        self, thread_id: int, parent: dict[str, Any], body: dict[str, Any], kind: int
    ) -> dict[str, Any]:
        name = str(body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _form_error(
                "name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
            )
        guild = self._guild(int(parent["guild_id"]))
        thread = self._thread_payload(thread_id, guild, int(parent["id"]), name, self.bot_id)
        thread["type"] = kind
        if body.get("auto_archive_duration"):
            thread["thread_metadata"]["auto_archive_duration"] = int(body["auto_archive_duration"])
        thread["member"] = {
            "id": str(thread_id),
            "user_id": str(self.bot_id),
            "join_timestamp": _now_iso(),
            "flags": 0,
        }
        self.channels[thread_id] = thread
        guild.threads[name] = thread_id
        self.threads_created.append(copy.deepcopy(thread))
        for session in self._sessions_for(guild.id, None):
            if session.intents & INTENT_GUILDS:
                self._emit(session, "THREAD_CREATE", {**thread, "newly_created": True})
        return copy.deepcopy(thread)

    def _add_reaction(self, call: ApiCall, channel_id: str, message_id: str, emoji: str) -> None:
        self._rest_message(channel_id, message_id)
        self.reactions.append((int(message_id), emoji))

    def _remove_reaction(self, call: ApiCall, channel_id: str, message_id: str, emoji: str) -> None:
        self._rest_message(channel_id, message_id)
        with contextlib.suppress(ValueError):
            self.reactions.remove((int(message_id), emoji))

    def _get_guild(self, call: ApiCall, guild_id: str) -> dict[str, Any]:
        guild = self._rest_guild(guild_id)
        payload = self._guild_create(guild)
        for key in ("channels", "threads", "members", "presences", "voice_states", "joined_at"):
            payload.pop(key, None)
        return payload

    def _get_guild_channels(self, call: ApiCall, guild_id: str) -> list[dict[str, Any]]:
        guild = self._rest_guild(guild_id)
        return [copy.deepcopy(self.channels[c]) for c in guild.channels.values()]

    def _get_member(self, call: ApiCall, guild_id: str, user_id: str) -> dict[str, Any]:
        member = self._rest_guild(guild_id).members.get(int(user_id))
        if member is None:
            raise ApiError(404, "Unknown Member", UNKNOWN_MEMBER)
        return copy.deepcopy(member)

    def _command_list(self, app_id: str, guild_id: str | None) -> list[dict[str, Any]]:
        if int(app_id) != self.application_id:
            raise ApiError(403, "Missing Access", MISSING_ACCESS)
        if guild_id is None:
            return self.global_commands
        self._rest_guild(guild_id)
        return self.guild_commands.setdefault(int(guild_id), [])

    def _get_commands(
        self, call: ApiCall, app_id: str, guild_id: str | None = None
    ) -> list[dict[str, Any]]:
        return copy.deepcopy(self._command_list(app_id, guild_id))

    def _put_commands(
        self, call: ApiCall, app_id: str, guild_id: str | None = None
    ) -> list[dict[str, Any]]:
        previous = {(c["name"], c["type"]): c["id"] for c in self._command_list(app_id, guild_id)}
        if not isinstance(call.body, list):
            raise _form_error("_", "LIST_TYPE_CONVERT", "Must be a list.")
        commands = [self._command(body, guild_id, previous) for body in call.body]
        if guild_id is None:
            self.global_commands = commands
        else:
            self.guild_commands[int(guild_id)] = commands
        self.commands = commands
        return copy.deepcopy(commands)

    def _post_command(
        self, call: ApiCall, app_id: str, guild_id: str | None = None
    ) -> dict[str, Any]:
        existing = self._command_list(app_id, guild_id)
        body = call.body if isinstance(call.body, dict) else {}
        previous = {(c["name"], c["type"]): c["id"] for c in existing}
        command = self._command(body, guild_id, previous)
        existing[:] = [c for c in existing if c["id"] != command["id"]] + [command]
        self.commands = existing
        return copy.deepcopy(command)

    def _delete_command(
        self, call: ApiCall, app_id: str, command_id: str, guild_id: str | None = None
    ) -> None:
        existing = self._command_list(app_id, guild_id)
        if not any(c["id"] == command_id for c in existing):
            raise ApiError(404, "Unknown application command", 10063)
        existing[:] = [c for c in existing if c["id"] != command_id]

    def _command(
        self,
        body: dict[str, Any],
        guild_id: str | None,
        previous: Mapping[tuple[str, int], str],
    ) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _form_error("name", "BASE_TYPE_REQUIRED", "This field is required")
        kind = int(body.get("type") or 1)
        command: dict[str, Any] = {
            "type": 1,
            "description": "",
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            "name_localizations": None,
            "description_localizations": None,
            "contexts": None,
            "integration_types": [0],
            **copy.deepcopy(body),
        }
        command.update(
            id=previous.get((name, kind)) or str(self._next_id()),
            application_id=str(self.application_id),
            version=str(self._next_id()),
            type=kind,
        )
        if guild_id is not None:
            command["guild_id"] = guild_id
        return command

    # -- interactions and their webhooks -------------------------------------------------

    def _interaction(self, app_id: str, token: str) -> InteractionRecord:
        for record in self.interactions:
            if record.token == token and int(app_id) == self.application_id:
                return record
        raise ApiError(404, "Unknown Webhook", UNKNOWN_WEBHOOK)

    def _interaction_callback(
        self, call: ApiCall, interaction_id: str, token: str
    ) -> dict[str, Any] | None:
        record = next(
            (r for r in self.interactions if r.id == int(interaction_id) and r.token == token),
            None,
        )
        if record is None:
            raise ApiError(404, "Unknown interaction", UNKNOWN_INTERACTION)
        if record.callbacks:
            raise ApiError(400, "Interaction has already been acknowledged.", ALREADY_ACKNOWLEDGED)
        body = call.body if isinstance(call.body, dict) else {}
        kind = int(body.get("type") or 0)
        data = body.get("data")
        if not isinstance(data, dict):
            data = {}
        if kind in (4, 7):
            _check_content(str(data.get("content") or ""))
        record.callbacks.append(copy.deepcopy(body))
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            flags = int(data.get("flags") or 0) | (_LOADING if kind == 5 else 0)
            record.original = self._response_message(record, data, flags)
            resource["message"] = copy.deepcopy(record.original)
        if call.query.get("with_response") not in ("1", "true", "True"):
            return None
        original = record.original
        return {
            "interaction": {
                "id": str(record.id),
                "type": 2,
                "response_message_id": None if original is None else original["id"],
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(
                    original is not None and int(original["flags"]) & _EPHEMERAL
                ),
            },
            "resource": resource,
        }

    def _response_message(
        self, record: InteractionRecord, data: Mapping[str, Any], flags: int
    ) -> dict[str, Any]:
        message = self._build_message(
            self._next_id(),
            record.channel_id,
            record.guild_id,
            dict(self.users[self.bot_id]),
            str(data.get("content") or ""),
            type_=20,
            attachments=[],
            embeds=list(data.get("embeds") or []),
            sticker_items=[],
        )
        message["flags"] = flags
        message["components"] = list(data.get("components") or [])
        message["webhook_id"] = str(self.application_id)
        message["application_id"] = str(self.application_id)
        message["interaction_metadata"] = {
            "id": str(record.id),
            "type": 2,
            "name": record.name,
            "user": dict(self.users[record.user_id]),
            "authorizing_integration_owners": record.payload["authorizing_integration_owners"],
        }
        return message

    def _response_target(self, record: InteractionRecord, target: str) -> dict[str, Any]:
        if target == "@original":
            if record.original is None:
                raise ApiError(404, "Unknown Message", UNKNOWN_MESSAGE)
            return record.original
        message = record.followup_messages.get(int(target))
        if message is None:
            raise ApiError(404, "Unknown Message", UNKNOWN_MESSAGE)
        return message

    def _get_response(self, call: ApiCall, app_id: str, token: str, target: str) -> dict[str, Any]:
        return copy.deepcopy(self._response_target(self._interaction(app_id, token), target))

    def _edit_response(self, call: ApiCall, app_id: str, token: str, target: str) -> dict[str, Any]:
        record = self._interaction(app_id, token)
        message = self._response_target(record, target)
        body = call.body if isinstance(call.body, dict) else {}
        if "content" in body:
            content = "" if body["content"] is None else str(body["content"])
            _check_content(content)
            message["content"] = content
        for key in ("embeds", "components"):
            if key in body:
                message[key] = list(body[key] or [])
        message["flags"] = int(message["flags"]) & ~_LOADING
        message["edited_timestamp"] = _now_iso()
        if target == "@original":
            record.edits.append(copy.deepcopy(body))
        return copy.deepcopy(message)

    def _delete_response(self, call: ApiCall, app_id: str, token: str, target: str) -> None:
        record = self._interaction(app_id, token)
        self._response_target(record, target)
        if target == "@original":
            record.original = None
            record.original_deleted = True
        else:
            record.followup_messages.pop(int(target))

    def _followup(self, call: ApiCall, app_id: str, token: str) -> dict[str, Any] | None:
        record = self._interaction(app_id, token)
        if not record.callbacks:
            raise ApiError(404, "Unknown Webhook", UNKNOWN_WEBHOOK)
        body = call.body if isinstance(call.body, dict) else {}
        content = "" if body.get("content") is None else str(body["content"])
        _check_content(content)
        message = self._response_message(record, body, int(body.get("flags") or 0))
        message["type"] = 0
        message["attachments"] = self._uploaded_attachments(call, record.channel_id)
        record.followup_messages[int(message["id"])] = message
        record.followups.append({**copy.deepcopy(body), "id": message["id"]})
        if call.query.get("wait") in ("1", "true", "True"):
            return copy.deepcopy(message)
        return None

    # -- builders ------------------------------------------------------------------------

    def _next_id(self) -> int:
        now = int(time.time() * 1000) - DISCORD_EPOCH
        self._id_clock = max(self._id_clock + 1, now)
        return self._id_clock << 22 | (next(self._id_increment) & 0xFFF)

    def _next_guild_id(self) -> int:
        index = len(self.guilds)
        now = int(time.time() * 1000) - DISCORD_EPOCH
        clock = max(self._id_clock + 1, now)
        clock += (index - clock) % _SHARD_SPREAD
        self._id_clock = clock
        return clock << 22 | (next(self._id_increment) & 0xFFF)

    def _make_user(self, user_id: int, username: str, *, bot: bool = False) -> dict[str, Any]:
        user: dict[str, Any] = {
            "id": str(user_id),
            "username": username,
            "discriminator": "0",
            "global_name": None if bot else username.title(),
            "avatar": None,
            "public_flags": 0,
        }
        if bot:
            user["bot"] = True
        return user

    def _ensure_user(
        self, user_id: int, username: str | None, *, bot: bool = False
    ) -> dict[str, Any]:
        """The user's payload, registered or updated (name, bot flag) on the way."""
        known = self.users.get(user_id)
        name = username or (str(known["username"]) if known else f"user{user_id}")
        is_bot = bot or user_id == self.bot_id
        if known is None or known["username"] != name or bool(known.get("bot")) != is_bot:
            self.users[user_id] = self._make_user(user_id, name, bot=is_bot)
        return dict(self.users[user_id])

    def _member(self, user_id: int, *, with_user: bool) -> dict[str, Any]:
        member: dict[str, Any] = {
            "roles": [],
            "joined_at": _now_iso(),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "nick": None,
            "avatar": None,
            "communication_disabled_until": None,
        }
        if with_user:
            member["user"] = dict(self.users[user_id])
        return member

    def _thread_payload(
        self, thread_id: int, guild: Guild, parent_id: int, name: str, owner_id: int
    ) -> dict[str, Any]:
        now = _now_iso()
        return {
            "id": str(thread_id),
            "type": 11,
            "guild_id": str(guild.id),
            "parent_id": str(parent_id),
            "owner_id": str(owner_id),
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "total_message_sent": 0,
            "rate_limit_per_user": 0,
            "flags": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
            },
        }

    def _guild_create(self, guild: Guild) -> dict[str, Any]:
        everyone = {
            "id": str(guild.id),
            "name": "@everyone",
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": 0,
            "permissions": str(EVERYONE_PERMISSIONS),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }
        return {
            "id": str(guild.id),
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(guild.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": [everyone],
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "max_members": 500_000,
            "max_video_channel_users": 25,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "incidents_data": None,
            "joined_at": _now_iso(),
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            "voice_states": [],
            "members": copy.deepcopy(list(guild.members.values())),
            "channels": [copy.deepcopy(self.channels[c]) for c in guild.channels.values()],
            "threads": [copy.deepcopy(self.channels[t]) for t in guild.threads.values()],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _mentions(
        self, content: str, guild_id: int | None, extra: Iterable[int]
    ) -> tuple[list[dict[str, Any]], list[str]]:
        ids: list[int] = []
        for user_id in itertools.chain((int(m) for m in _MENTION_RE.findall(content)), extra):
            if user_id in self.users and user_id not in ids:
                ids.append(user_id)
        mentions = []
        for user_id in ids:
            mention = dict(self.users[user_id])
            if guild_id is not None:
                mention["member"] = self._member(user_id, with_user=False)
            mentions.append(mention)
        return mentions, _ROLE_MENTION_RE.findall(content)

    def _build_message(
        self,
        message_id: int,
        channel_id: int,
        guild_id: int | None,
        author: dict[str, Any],
        content: str,
        *,
        type_: int,
        attachments: list[dict[str, Any]],
        embeds: list[dict[str, Any]],
        sticker_items: list[dict[str, Any]],
        webhook_id: int | None = None,
        reply_to: int | str | None = None,
        ping_reply: bool = False,
    ) -> dict[str, Any]:
        referenced: dict[str, Any] | None = None
        if reply_to is not None:
            referenced = self._messages.get(int(reply_to))
            if referenced is None:
                raise KeyError(f"reply_to: no message {reply_to}")
        extra = [int(referenced["author"]["id"])] if referenced is not None and ping_reply else []
        mentions, mention_roles = self._mentions(content, guild_id, extra)
        message: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": datetime.fromtimestamp(
                snowflake_time_ms(message_id) / 1000, UTC
            ).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": guild_id is not None
            and ("@everyone" in content or "@here" in content)
            and int(author["id"]) != self.bot_id,
            "mentions": mentions,
            "mention_roles": mention_roles,
            "attachments": attachments,
            "embeds": embeds,
            "pinned": False,
            "type": type_,
            "flags": 0,
            "components": [],
        }
        if sticker_items:
            message["sticker_items"] = sticker_items
        if guild_id is not None:
            message["guild_id"] = str(guild_id)
            if webhook_id is None:
                message["member"] = self._member(int(author["id"]), with_user=False)
        if webhook_id is not None:
            message["webhook_id"] = str(webhook_id)
            message["author"] = {**author, "bot": True}
        if referenced is not None:
            reference = {
                "type": 0,
                "message_id": referenced["id"],
                "channel_id": referenced["channel_id"],
            }
            if "guild_id" in referenced:
                reference["guild_id"] = referenced["guild_id"]
            message["message_reference"] = reference
            message["referenced_message"] = {
                k: copy.deepcopy(v) for k, v in referenced.items() if k != "referenced_message"
            }
        return message

    def _attachment(self, given: Mapping[str, Any]) -> dict[str, Any]:
        attachment_id = str(given.get("id") or self._next_id())
        filename = str(given.get("filename") or "file.bin")
        url = given.get("url") or f"{self.url}/attachments/0/{attachment_id}/{filename}"
        return {
            "id": attachment_id,
            "filename": filename,
            "size": int(given.get("size") or 0),
            "url": url,
            "proxy_url": given.get("proxy_url") or url,
            **{k: v for k, v in given.items() if k not in ("id", "filename", "size", "url")},
        }

    def _uploaded_attachments(self, call: ApiCall, channel_id: int) -> list[dict[str, Any]]:
        attachments = []
        for upload in call.files:
            attachment_id = self._next_id()
            filename = upload.filename or "file.bin"
            self.files[attachment_id] = (upload.content_type, upload.content)
            url = f"{self.url}/attachments/{channel_id}/{attachment_id}/{filename}"
            attachments.append(
                {
                    "id": str(attachment_id),
                    "filename": filename,
                    "size": len(upload.content),
                    "url": url,
                    "proxy_url": url,
                    "content_type": upload.content_type,
                }
            )
        return attachments

    def _find_command(self, name: str, guild_id: int | None) -> tuple[dict[str, Any] | None, bool]:
        if guild_id is not None:
            for command in self.guild_commands.get(guild_id, []):
                if command["name"] == name and command["type"] == 1:
                    return command, True
        for command in self.global_commands:
            if command["name"] == name and command["type"] == 1:
                return command, False
        return None, False

    # -- lookups -------------------------------------------------------------------------

    def _guild(self, guild: Guild | int) -> Guild:
        guild_id = guild.id if isinstance(guild, Guild) else guild
        found = self.guilds.get(guild_id)
        if found is None:
            raise KeyError(f"no guild {guild_id}: add it with add_guild()")
        return found

    def _channel(self, channel_id: int) -> dict[str, Any]:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise KeyError(
                f"no channel {channel_id}: use add_guild(), add_thread() or dm_channel()"
            )
        return channel

    def _guild_id_of(self, message: Mapping[str, Any]) -> int | None:
        guild_id = message.get("guild_id")
        return None if guild_id is None else int(guild_id)

    def _rest_channel(self, channel_id: str) -> dict[str, Any]:
        channel = self.channels.get(int(channel_id))
        if channel is None:
            raise ApiError(404, "Unknown Channel", UNKNOWN_CHANNEL)
        return channel

    def _rest_message(self, channel_id: str, message_id: str) -> dict[str, Any]:
        self._rest_channel(channel_id)
        message = self._messages.get(int(message_id))
        if (
            message is None
            or int(message_id) in self._removed
            or message["channel_id"] != channel_id
        ):
            raise ApiError(404, "Unknown Message", UNKNOWN_MESSAGE)
        return message

    def _rest_guild(self, guild_id: str) -> Guild:
        guild = self.guilds.get(int(guild_id))
        if guild is None:
            raise ApiError(404, "Unknown Guild", UNKNOWN_GUILD)
        return guild

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


# -- helpers -----------------------------------------------------------------------------


def _json(body: Any, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    # discord.py decodes JSON only when Content-Type is exactly "application/json"
    # (web.json_response adds "; charset=utf-8"); 429s need "Via" to be trusted.
    all_headers = {hdrs.CONTENT_TYPE: "application/json", "Via": "1.1 google", **(headers or {})}
    return web.Response(body=json.dumps(body).encode(), status=status, headers=all_headers)


def _check_content(content: str) -> None:
    if len(content) > MAX_CONTENT_LENGTH:
        raise _form_error(
            "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT_LENGTH} or fewer in length."
        )


def _delete_event(message: Mapping[str, Any]) -> dict[str, Any]:
    event = {"id": message["id"], "channel_id": message["channel_id"]}
    if "guild_id" in message:
        event["guild_id"] = message["guild_id"]
    return event


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _command_options(
    values: Mapping[str, Any], command: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    declared = {o["name"]: int(o["type"]) for o in (command or {}).get("options") or []}
    options = []
    for name, value in values.items():
        kind = declared.get(name)
        if kind is None:
            if isinstance(value, bool):
                kind = 5
            elif isinstance(value, int):
                kind = 4
            elif isinstance(value, float):
                kind = 10
            else:
                kind = 3
        options.append({"name": name, "type": kind, "value": value})
    return options


async def _read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """The JSON body (or the payload_json part of a multipart one) and the uploaded files."""
    if not request.body_exists:
        return None, []
    if request.content_type == "multipart/form-data":
        payload: Any = None
        files: list[UploadedFile] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            data = bytes(await part.read(decode=True))
            if part.name == "payload_json":
                payload = json.loads(data)
            else:
                content_type = part.headers.get(hdrs.CONTENT_TYPE, "application/octet-stream")
                files.append(UploadedFile(part.name or "", part.filename, content_type, data))
        return payload, files
    raw = await request.read()
    if not raw:
        return None, []
    text = raw.decode()
    if request.content_type == "application/json":
        return json.loads(text), []
    try:
        return json.loads(text), []
    except ValueError:
        return text, []
