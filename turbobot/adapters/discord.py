"""The Discord adapter, on discord.py (extra ``discord``).

Where the bot answers: in DMs always; in server channels when mentioned, replied to,
addressed by a command, or (configurable) always or on a trigger word. It ignores
bots, webhooks, system messages and itself. A thread is a channel of its own. In
server channels each member has their own conversation by default (``per-user``), or
one conversation is shared (``shared``: each message is prefixed with the speaker).
A reply to one of the bot's messages continues the conversation that message belongs
to, whoever replies. With ``threads`` on, a new conversation in a server channel
opens a thread of its own, and everything said in a thread the bot opened is for it.

Received messages go through one queue in gateway order and are committed in
batches. Discord does not redeliver what the bot missed while it was offline; it
does repeat events after a RESUME, and the inbox drops those (same message id).

Replies are Markdown (Discord renders it), split at 2,000 characters without breaking
words or code blocks; the first part replies to the user's message; model output can
never ping anyone (``allowed_mentions`` is none). Streaming replies are edited as they
grow, at most one edit per ``stream_interval`` per channel (Discord allows about 5
edits per 5 seconds in a channel), roll over to a new message at the length limit,
and always end as the complete text. discord.py waits out 429s per route (a 429 in
one channel does not stall the others).

Commands (``/start``, ``/reset``, ``/retry``, ``/cancel``, ``/help`` and a bot's own)
are registered as slash commands when the bot connects, and work as text too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from turbobot.adapters._common import RateLimiter, RedactSecrets, guard_logs, platform_id, serve
from turbobot.chat import Attachment, ChannelKey, IncomingMessage
from turbobot.commands import CommandRegistry, split_command
from turbobot.delivery import delivering
from turbobot.exceptions import ConfigurationError, UndeliverableError
from turbobot.formatting import split_markdown
from turbobot.runtime import BaseSender, Runtime, answering
from turbobot.template import INTERRUPTED, AssistantStream

if TYPE_CHECKING:
    from turbobot.platforms import Launch

try:
    with warnings.catch_warnings():
        # discord.py imports audioop (voice), deprecated since Python 3.11
        warnings.filterwarnings("ignore", message=".*audioop.*", category=DeprecationWarning)
        import aiohttp
        import discord
        import yarl
        from discord.gateway import DiscordWebSocket
        from discord.http import Route, handle_message_parameters
        from discord.utils import MISSING
except ImportError as exc:  # pragma: no cover - exercised through the CLI message
    raise ConfigurationError(
        "the Discord adapter needs discord.py: run `make install` or "
        "`pip install 'turbobot[discord]'`"
    ) from exc

__all__ = ["DiscordAdapter", "DiscordSettings", "run_platform", "settings_from"]

_log = logging.getLogger(__name__)
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")

#: Discord's limit for one message's content, in characters
MESSAGE_LIMIT = 2000
#: messages the gateway may hand over in one batch commit
_BATCH = 256
#: message ids remembered for reply chains and redelivered events
_REMEMBERED = 100_000
#: how long a deferred slash command waits for the reply that answers it (Discord
#: keeps an interaction's token for 15 minutes)
_INTERACTION_TTL = 14 * 60.0
#: seconds a lookup on the way in (a reply chain's message, a new thread) may take: the
#: queue is ordered, so a long 429 there would stall every channel behind it
_LOOKUP_TIMEOUT = 5.0
#: seconds to take streaming previews away when a stop abandons their step
_CLEANUP_TIMEOUT = 3.0
#: typing indicators a second, across all channels
_TYPING_RATE = 5.0
_NO_PINGS = discord.AllowedMentions.none()
#: where an interaction's token shows in discord.py's DEBUG logs: webhook and callback
#: URLs, and the INTERACTION_CREATE payload (a token answers the interaction for 15 min)
_INTERACTION_TOKENS = (
    re.compile(r"/(?:webhooks|interactions)/\d+/([^/\s'\"?]+)"),
    re.compile(r"""["']token["']\s*:\s*["']([^"']+)["']"""),
)
#: what ends a preview that stops inside a code block
_OPEN_CODE_MORE = "\n```\n…"
#: message types that are something a person said (the rest are system messages)
_SAID = (discord.MessageType.default, discord.MessageType.reply)
Respond = Literal["mention", "always"]
GroupMode = Literal["per-user", "shared"]


@dataclass(frozen=True, slots=True)
class DiscordSettings:
    """How the Discord adapter connects and behaves.

    Args:
        token: the bot token from the Developer Portal (never logged).
        api_base_url: a proxy or test server for the REST API (``http://host:port/api/v10``).
        gateway_url: a proxy or test server for the gateway (``ws://host:port/gateway``).
        respond: in server channels, answer only when addressed (``mention``: a
            mention, a reply to the bot, a command or the trigger) or to every
            message (``always``).
        trigger: a prefix or word that also addresses the bot (``!ask``, ``jarvis``).
        group_mode: ``per-user`` (a conversation per member in a server channel) or
            ``shared`` (one per channel, each message prefixed with the speaker).
        threads: a new conversation in a server channel opens its own thread.
        stream_interval: seconds between edits of streaming replies in one channel.
        shard_count, shard_ids: run these shards of a bot split across processes.
        ready_timeout: seconds discord.py waits for the servers' data when connecting.
    """

    token: str
    api_base_url: str | None = None
    gateway_url: str | None = None
    respond: Respond = "mention"
    trigger: str | None = None
    group_mode: GroupMode = "per-user"
    threads: bool = False
    stream_interval: float = 1.2
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None
    ready_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigurationError(
                "DISCORD_BOT_TOKEN is not set: create a bot in the Discord Developer Portal "
                "(Applications > your app > Bot > Reset Token) and set DISCORD_BOT_TOKEN "
                "(in the environment or a .env file)"
            )
        if self.respond not in ("mention", "always"):
            raise ConfigurationError(f"respond mode {self.respond!r} is not 'mention' or 'always'")
        if self.group_mode not in ("per-user", "shared"):
            raise ConfigurationError(
                f"group mode {self.group_mode!r} is not 'per-user' or 'shared'"
            )
        for name, url, schemes in (
            ("DISCORD_API_BASE_URL", self.api_base_url, ("http", "https")),
            ("DISCORD_GATEWAY_URL", self.gateway_url, ("ws", "wss")),
        ):
            if url is not None and yarl.URL(url).scheme not in schemes:
                raise ConfigurationError(
                    f"{name} must start with {schemes[0]}:// or {schemes[1]}://, not {url!r}"
                )
        if self.shard_count is not None and self.shard_count < 1:
            raise ConfigurationError(
                f"the shard count (--shard-count or DISCORD_SHARD_COUNT) must be at least 1, "
                f"not {self.shard_count}"
            )
        if self.shard_ids is not None:
            if self.shard_count is None:
                raise ConfigurationError(
                    "the shard ids (--shard-ids or DISCORD_SHARD_IDS) need the total number "
                    "of shards too (--shard-count or DISCORD_SHARD_COUNT)"
                )
            bad = [i for i in self.shard_ids if not 0 <= i < self.shard_count]
            if bad or not self.shard_ids:
                raise ConfigurationError(
                    f"with {self.shard_count} shard(s), shard ids go from 0 to "
                    f"{self.shard_count - 1}: {', '.join(map(str, bad)) or 'none'} given"
                )
        if self.stream_interval <= 0:
            raise ConfigurationError("the streaming edit interval must be positive")

    def __repr__(self) -> str:  # the token never reaches a log
        return (
            f"DiscordSettings(api_base_url={self.api_base_url!r}, respond={self.respond!r}, "
            f"group_mode={self.group_mode!r}, threads={self.threads!r}, "
            f"shard_count={self.shard_count!r}, shard_ids={self.shard_ids!r})"
        )


class _Recent(OrderedDict[_K, _V]):
    """A dict that forgets its oldest entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def remember(self, key: _K, value: _V) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class DiscordAdapter(BaseSender):
    """Runs a :class:`~turbobot.runtime.Runtime` as a Discord bot.

    Use it as an async context manager (it logs in: a wrong token is a
    :class:`~turbobot.exceptions.ConfigurationError`), then ``await adapter.run(runtime)``
    until :meth:`stop` (or SIGINT/SIGTERM).
    """

    def __init__(
        self, settings: DiscordSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._redact = RedactSecrets(settings.token, patterns=_INTERACTION_TOKENS)
        guard_logs(self._redact)
        # discord.py has no option for another server: these two class attributes are
        # where it builds its URLs from (one bot per process, so setting them is safe).
        if settings.api_base_url:
            Route.BASE = settings.api_base_url.rstrip("/")
        if settings.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)
        _tolerate_lone_surrogates()
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enabled in the Developer Portal
        intents.typing = False  # other people typing is of no use to the bot
        options: dict[str, Any] = {
            "intents": intents,
            "max_messages": None,  # no message cache: edits are not input
            "member_cache_flags": discord.MemberCacheFlags.none(),
            "chunk_guilds_at_startup": False,
            "guild_ready_timeout": settings.ready_timeout,
            "allowed_mentions": _NO_PINGS,
        }
        self.client: discord.Client
        if settings.shard_count is not None:
            if settings.shard_ids:
                options["shard_ids"] = list(settings.shard_ids)
            self.client = discord.AutoShardedClient(shard_count=settings.shard_count, **options)
        else:
            self.client = discord.Client(**options)
        self.client.on_message = self._on_message  # type: ignore[attr-defined]
        self.client.on_interaction = self._on_interaction  # type: ignore[attr-defined]
        self.client.on_ready = self._on_ready  # type: ignore[attr-defined]
        self._queue: asyncio.Queue[discord.Message | IncomingMessage | None] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._commands: CommandRegistry | None = None
        self._registered = False
        #: the conversation each of the bot's recent messages belongs to (reply chains)
        self._sent: _Recent[int, ChannelKey] = _Recent(_REMEMBERED)
        #: the conversation of recent user messages, to follow a chain through them
        self._received: _Recent[int, ChannelKey] = _Recent(_REMEMBERED)
        #: message ids already handed to the runtime (redelivered events are dropped)
        self._seen: _Recent[int, None] = _Recent(_REMEMBERED)
        #: the channel each recent user message was said in (replies reference it)
        self._origin: _Recent[int, int] = _Recent(_REMEMBERED)
        #: messages (and slash commands) whose first reply is out: later ones stand alone
        self._answered: _Recent[str, None] = _Recent(_REMEMBERED)
        #: slash commands waiting for their reply, by message id: the interaction, and
        #: whether its "thinking…" acknowledgement went through
        self._pending: dict[str, tuple[discord.Interaction, asyncio.Task[bool]]] = {}
        #: threads the bot opened for a conversation
        self._own_threads: _Recent[int, None] = _Recent(_REMEMBERED)
        self._typing = RateLimiter(_TYPING_RATE, burst=int(_TYPING_RATE))
        #: when each channel may see the next streaming edit
        self._next_edit: dict[int, float] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self.bot_id: int | None = None
        self.username: str | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> DiscordAdapter:
        try:
            await self.client.login(self.settings.token)
        except discord.LoginFailure as exc:
            await self.client.close()
            raise ConfigurationError(
                "Discord refused the bot token (401 Unauthorized): check DISCORD_BOT_TOKEN "
                "(and DISCORD_API_BASE_URL if you set one)"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            await self.client.close()
            raise ConfigurationError(
                f"cannot reach the Discord API ({type(exc).__name__}): check the network "
                "and DISCORD_API_BASE_URL"
            ) from exc
        except discord.HTTPException as exc:
            await self.client.close()
            raise ConfigurationError(
                f"the Discord API answered {exc.status} at login: check DISCORD_API_BASE_URL "
                "(it ends in /api/v10)"
            ) from exc
        except BaseException:
            await self.client.close()
            raise
        user = self.client.user
        assert user is not None  # set by login
        self.bot_id, self.username = user.id, user.name
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()

    def stop(self) -> None:
        """Stop receiving; :meth:`run` returns once what was received is committed."""
        self._stopping.set()

    async def run(self, runtime: Runtime, *, handle_signals: bool = True) -> None:
        """Connect to the gateway and hand messages to ``runtime`` until stopped."""
        self._commands = runtime.commands
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self.stop)
        consumer = asyncio.create_task(self._consume(runtime))
        connection = asyncio.create_task(self.client.connect(reconnect=True))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([connection, stopping], return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                _raise_connection_error(connection)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            self._stopping.set()
            stopping.cancel()
            # Stop reading the gateway; sending (HTTP) stays open until __aexit__, so
            # the steps in flight can still answer while the runtime closes.
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection
            self._queue.put_nowait(None)
            await consumer

    async def wait_until_ready(self) -> None:
        """Wait until the gateway is connected and the commands are registered."""
        await self._ready.wait()

    async def _on_ready(self) -> None:
        user = self.client.user
        _log.info("Discord: connected as %s (id %s)", user, user.id if user else "?")
        if not self._registered and self._commands is not None:
            self._registered = True
            await self._register_commands(self._commands)
        self._ready.set()

    async def _register_commands(self, commands: CommandRegistry) -> None:
        """Make the runtime's commands slash commands (best effort: text works anyway)."""
        payload = []
        for command in commands:
            entry: dict[str, Any] = {
                "name": command.name,
                "description": command.description[:100] or command.name,
                "type": 1,
            }
            if command.handler is not None or command.input or command.choices:
                # a bot's own command may take arguments; /mode offers the modes
                option: dict[str, Any] = {
                    "type": 3,
                    "name": "text",
                    "description": "arguments",
                    "required": False,
                }
                if command.choices:
                    option["choices"] = [{"name": c, "value": c} for c in command.choices[:25]]
                entry["options"] = [option]
            payload.append(entry)
        application_id = self.client.application_id
        if application_id is None:
            _log.warning("Discord: no application id; slash commands are not registered")
            return
        try:
            await self.client.http.bulk_upsert_global_commands(application_id, payload)
        except discord.HTTPException as exc:
            _log.warning("Discord: could not register the slash commands (%s)", exc)

    # -- incoming ---------------------------------------------------------------------

    async def _on_message(self, message: discord.Message) -> None:
        # Before any await: discord.py starts one task per event, in gateway order, so
        # the queue keeps that order.
        if self._stopping.is_set():
            _log.warning("Discord: a message arrived while stopping; it is not handled")
            return
        self._queue.put_nowait(message)

    async def _on_interaction(self, interaction: discord.Interaction) -> None:
        if interaction.type != discord.InteractionType.application_command:
            return
        if self._stopping.is_set():
            return
        incoming = self.command_message(interaction)
        if incoming is None:
            return
        # Queued before any await, in gateway order with the messages. Discord wants an
        # answer within 3 s: "thinking…" now, replaced by the reply when it comes.
        self._queue.put_nowait(incoming)
        deferred = asyncio.create_task(self._defer(interaction))
        self._pending[incoming.message_id] = (interaction, deferred)
        asyncio.get_running_loop().call_later(
            _INTERACTION_TTL, self._expire_interaction, incoming.message_id
        )

    @staticmethod
    async def _defer(interaction: discord.Interaction) -> bool:
        try:
            await interaction.response.defer(thinking=True)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            _log.warning("Discord: could not acknowledge a slash command (%s)", exc)
            return False
        return True

    def _expire_interaction(self, message_id: str) -> None:
        self._spawn(self._drop_interaction(message_id))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop_interaction(self, message_id: str) -> None:
        """Take away a "thinking…" no reply came for (a command that answers nothing)."""
        pending = self._pending.pop(message_id, None)
        if pending is None:
            return
        interaction, deferred = pending
        if await deferred and not interaction.is_expired():
            with contextlib.suppress(discord.HTTPException, aiohttp.ClientError, OSError):
                await interaction.delete_original_response()

    async def handled(self, message: IncomingMessage) -> None:
        await self._drop_interaction(message.message_id)

    async def _consume(self, runtime: Runtime) -> None:
        """Hand received messages to the runtime in order, a batch per commit."""
        while True:
            item = await self._queue.get()
            batch = [item]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            messages: list[IncomingMessage] = []
            for entry in batch:
                if entry is None:
                    continue
                try:
                    incoming = (
                        entry if isinstance(entry, IncomingMessage) else await self._convert(entry)
                    )
                except Exception:
                    _log.exception("Discord: skipped a message that could not be read")
                    continue
                if incoming is not None:
                    messages.append(incoming)
            if messages:
                try:
                    await runtime.receive_many(messages)
                except Exception:
                    _log.exception("Discord: %d message(s) could not be handed over", len(messages))
            if None in batch:
                return

    async def _convert(self, message: discord.Message) -> IncomingMessage | None:
        if message.id in self._seen:
            return None  # the gateway repeated it (after a RESUME)
        incoming = await self.to_incoming(message)
        if incoming is not None:
            self._seen.remember(message.id, None)
            self._received.remember(message.id, incoming.key)
            self._origin.remember(message.id, message.channel.id)
        return incoming

    async def to_incoming(self, message: discord.Message) -> IncomingMessage | None:
        """The platform-neutral message for ``message``, or ``None`` if it is not for the bot."""
        author = message.author
        if author.id == self.bot_id or author.bot or message.webhook_id is not None:
            return None
        if message.type not in _SAID:
            return None  # a member joined, a pin, a boost...: not for us
        attachments = tuple(
            Attachment(_attachment_kind(a), url=a.url, name=a.filename) for a in message.attachments
        ) + tuple(Attachment("sticker", name=s.name) for s in message.stickers)
        text = message.content
        if not text.strip() and not attachments:
            return None
        channel = message.channel
        name = author.display_name
        if not _in_server(message):
            key = ChannelKey("discord", str(channel.id))
        else:
            addressed, text = self._addressed(message, text)
            if not addressed:
                return None
            key = await self._conversation(message, text)
            if self.settings.group_mode == "shared" and text.strip() and not self._is_command(text):
                text = f"{name}: {text}"
        return IncomingMessage(
            key=key,
            text=text,
            message_id=str(message.id),
            author_id=str(author.id),
            author_name=name,
            timestamp=message.created_at.timestamp(),
            attachments=attachments,
            reply_to=str(message.reference.message_id)
            if message.reference is not None and message.reference.message_id
            else None,
            guild=_guild_of(message),
        )

    def command_message(self, interaction: discord.Interaction) -> IncomingMessage | None:
        """A slash command as the text command it stands for (``/name arguments``)."""
        data: Mapping[str, Any] = interaction.data or {}
        name = data.get("name")
        if not isinstance(name, str) or interaction.channel_id is None:
            return None
        arguments = " ".join(
            str(option.get("value", "")) for option in data.get("options", ()) or ()
        ).strip()
        user = interaction.user
        channel_id = interaction.channel_id
        shared = self.settings.group_mode == "shared" or self._own_thread(interaction.channel)
        if interaction.guild_id is None or shared:
            key = ChannelKey("discord", str(channel_id))
        else:
            key = ChannelKey("discord", str(channel_id), None, str(user.id))
        return IncomingMessage(
            key=key,
            text=f"/{name} {arguments}".strip(),
            message_id=f"interaction-{interaction.id}",
            author_id=str(user.id),
            author_name=user.display_name,
            timestamp=interaction.created_at.timestamp(),
            guild=None if interaction.guild_id is None else str(interaction.guild_id),
        )

    def _is_command(self, text: str) -> bool:
        found = split_command(text, self.username)
        return found is not None and self._commands is not None and found[0] in self._commands

    def _own_thread(self, channel: object) -> bool:
        if getattr(channel, "id", None) in self._own_threads:
            return True
        return isinstance(channel, discord.Thread) and channel.owner_id == self.bot_id

    def _shared(self, message: discord.Message) -> bool:
        return self.settings.group_mode == "shared" or self._own_thread(message.channel)

    def _addressed(self, message: discord.Message, text: str) -> tuple[bool, str]:
        """Whether a server message is for the bot, and its text without the mention."""
        mention = re.compile(rf"<@!?{self.bot_id}>")
        addressed = self.settings.respond == "always" or self._own_thread(message.channel)
        if mention.search(text) or any(u.id == self.bot_id for u in message.mentions):
            addressed = True
            # whitespace is tidied only where the mention was (code keeps its indents)
            rest = re.sub(rf"[ \t]*<@!?{self.bot_id}>[ \t]*", " ", text).strip()
            text = rest or text  # a bare mention stays as it is: it is what they said
        if self._replies_to_bot(message) or self._is_command(text):
            addressed = True
        trigger = self.settings.trigger
        if trigger:
            if re.match(rf"{re.escape(trigger)}(?!\w)", text, re.I):  # "ai", not "aim"
                addressed = True
                text = text[len(trigger) :].lstrip(" ,:") or text
            elif re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.I):
                addressed = True
        return addressed, _readable_mentions(message, text)

    def _replies_to_bot(self, message: discord.Message) -> bool:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return False
        if reference.message_id in self._sent:
            return True
        resolved = reference.resolved
        return isinstance(resolved, discord.Message) and resolved.author.id == self.bot_id

    async def _conversation(self, message: discord.Message, text: str) -> ChannelKey:
        """The conversation a server message belongs to."""
        channel_id = str(message.channel.id)
        if self._shared(message):
            return ChannelKey("discord", channel_id)
        own = ChannelKey("discord", channel_id, None, str(message.author.id))
        if self._replies_to_bot(message):
            followed = await self._chain(message)
            if followed is not None and followed.channel == channel_id:
                return followed
            return own
        if self.settings.threads and not self._is_command(text):
            return await self._open_thread(message, text) or own
        return own

    async def _chain(self, message: discord.Message) -> ChannelKey | None:
        """The conversation of the bot's message ``message`` replies to: remembered, or
        (after a restart) that of the member the bot's message answered."""
        reference = message.reference
        assert reference is not None and reference.message_id is not None
        key = self._sent.get(reference.message_id)
        if key is not None:
            return key
        resolved = reference.resolved
        if not isinstance(resolved, discord.Message) or resolved.reference is None:
            return None
        answered = resolved.reference.message_id
        if answered is None:
            return None
        key = self._received.get(answered)
        if key is not None:
            return key
        try:
            async with asyncio.timeout(_LOOKUP_TIMEOUT):
                original = await message.channel.fetch_message(answered)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.info("Discord: could not follow a reply chain (%r); the member's own", exc)
            return None
        return ChannelKey("discord", str(message.channel.id), None, str(original.author.id))

    async def _open_thread(self, message: discord.Message, text: str) -> ChannelKey | None:
        if isinstance(message.channel, discord.Thread):
            return None
        title = " ".join(text.split())[:80] or "Conversation"
        try:
            async with asyncio.timeout(_LOOKUP_TIMEOUT):
                thread = await message.create_thread(name=title)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.warning("Discord: could not open a thread (%s); answering in the channel", exc)
            return None
        self._own_threads.remember(thread.id, None)
        return ChannelKey("discord", str(thread.id))

    # -- sending (BaseSender) ---------------------------------------------------------

    async def send(self, key: ChannelKey, text: str) -> str | None:
        parts = _parts(text)
        ids: list[str] = []
        with _undeliverable():
            for index, part in enumerate(parts):
                # each part waits out 429s and blips itself: a failure after the first
                # part would make the outbox send the parts already shown again
                post = partial(self._post, key, part, first=index == 0, part=index)
                shown = await self._retrying(post)
                ids.append(str(shown.id))
        return platform_id(ids)

    async def is_admin(self, key: ChannelKey, user_id: str) -> bool:
        """Members with the Administrator permission (the server's owner has it), in
        the server the channel belongs to; no one in direct messages."""
        channel = self.client.get_channel(int(key.channel))
        guild = getattr(channel, "guild", None)
        if not isinstance(guild, discord.Guild):
            return False
        member = guild.get_member(int(user_id)) or await guild.fetch_member(int(user_id))
        return member.guild_permissions.administrator

    async def typing(self, key: ChannelKey) -> None:
        asked = answering.get()
        if asked is not None and asked.message_id in self._pending:
            return  # the slash command's "thinking…" already says so
        # Only with spare capacity: a backlog of replies must not turn into a flood of
        # typing indicators (Discord allows a bot about 50 requests a second in all).
        if self._typing.try_acquire():
            await self.client.http.send_typing(int(key.channel))

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        shown: list[tuple[discord.Message, str]] = []  # the messages on screen and their text
        try:
            with _undeliverable():
                return await self._stream(key, stream, shown)
        except asyncio.CancelledError:
            # A stop outlasted its grace and abandoned the step: it is done again on the
            # next start, whole. The previews go, so the reply is not read twice.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(_CLEANUP_TIMEOUT):
                    for message, _ in shown:
                        await message.delete()
            raise

    async def _stream(
        self, key: ChannelKey, stream: AssistantStream, shown: list[tuple[discord.Message, str]]
    ) -> str | None:
        channel = int(key.channel)
        text = ""
        update: asyncio.Task[None] | None = None
        try:
            async for delta in stream:
                text += delta
                if update is not None:
                    if not update.done():
                        continue  # the screen catches up when that edit is through
                    update.result()  # a refusal (403, 404) ends it here; blips were logged
                now = self._clock()
                if now < self._next_edit.get(channel, 0.0) or not text.strip():
                    continue
                if len(self._next_edit) > _REMEMBERED:  # forget channels long quiet
                    self._next_edit = {c: t for c, t in self._next_edit.items() if t > now}
                self._next_edit[channel] = now + self.settings.stream_interval
                update = asyncio.create_task(self._show(key, shown, _parts(text, preview=True)))
        except asyncio.CancelledError:
            if update is not None:
                update.cancel()  # the step is abandoned (see send_stream)
            raise
        finally:
            if update is not None:
                with contextlib.suppress(Exception):
                    await update
        if stream.interrupted:
            # The generation broke off: what is on screen stays, marked as interrupted.
            if not shown:
                return None
            # marked where the stream broke off (previews lag behind it)
            marked = split_markdown(stream.text, MESSAGE_LIMIT - len(INTERRUPTED))
            marked[-1] += INTERRUPTED
            with contextlib.suppress(discord.HTTPException):
                await self._show(key, shown, marked, final=True)
            return platform_id([str(m.id) for m, _ in shown])
        final = _parts(stream.text)
        for message, _ in shown[len(final) :]:  # fewer parts than shown: take the rest away
            with contextlib.suppress(discord.HTTPException):
                await self._retrying(message.delete)
        del shown[len(final) :]
        await self._show(key, shown, final, final=True)
        return platform_id([str(m.id) for m, _ in shown])

    async def _show(
        self,
        key: ChannelKey,
        shown: list[tuple[discord.Message, str]],
        parts: list[str],
        *,
        final: bool = False,
    ) -> None:
        """Make the messages on screen read ``parts``: edit what changed, post the rest.

        Previews are best effort (the next one or the final text catches up); the final
        text is retried until it is through.
        """
        for index, part in enumerate(parts):
            try:
                if index < len(shown):
                    message, content = shown[index]
                    if content != part:
                        edit = _edit_with(message, part)
                        await (self._retrying(edit) if final else edit())
                        shown[index] = (message, part)
                else:
                    post = partial(self._post, key, part, first=index == 0, part=index)
                    message = await (self._retrying(post) if final else post())
                    shown.append((message, part))
            except discord.HTTPException as exc:
                if final or isinstance(exc, discord.Forbidden | discord.NotFound):
                    raise
                _log.debug("Discord: a streaming preview failed: %s", exc)
                return

    async def _post(
        self, key: ChannelKey, text: str, *, first: bool, part: int = 0
    ) -> discord.Message:
        """Post one message to ``key``'s channel. The first part of the first reply to a
        message (see :data:`~turbobot.runtime.answering`) answers its slash command, or
        replies to it.

        A reply's ``part``-th message carries a nonce derived from the reply's outbox id
        (``delivering``) and asks Discord to enforce it: posted again (after a failure
        or a restart), Discord gives back the message it has instead of showing a second
        one; that message is then made to read ``text`` (it may be a stream's preview)."""
        asked = answering.get() if first else None
        if asked is not None and (asked.key != key or asked.message_id in self._answered):
            asked = None
        if asked is not None:
            followup = await self._follow_up(asked.message_id, text)
            if followup is not None:
                self._answered.remember(asked.message_id, None)
                self._sent.remember(followup.id, key)
                return followup
        channel_id = int(key.channel)
        channel = self.client.get_partial_messageable(channel_id)
        said = int(asked.message_id) if asked is not None and asked.message_id.isdigit() else 0
        reference = None
        if said and self._origin.get(said) == channel_id:
            # (a message that opened a thread was said in the channel above it)
            reference = discord.MessageReference(
                message_id=said, channel_id=channel_id, fail_if_not_exists=False
            )
        reply = delivering.get()
        if reply is not None:
            message = await self._post_once(channel, text, reference, _nonce(reply, part))
        elif reference is not None:
            message = await channel.send(
                text, allowed_mentions=_NO_PINGS, reference=reference, mention_author=False
            )
        else:
            message = await channel.send(text, allowed_mentions=_NO_PINGS)
        if asked is not None:
            self._answered.remember(asked.message_id, None)
        self._sent.remember(message.id, key)
        return message

    async def _post_once(
        self,
        channel: discord.PartialMessageable,
        text: str,
        reference: discord.MessageReference | None,
        nonce: str,
    ) -> discord.Message:
        """``channel.send`` with ``enforce_nonce``, which discord.py does not offer: the
        same request, built with its own helper, plus that field."""
        state = channel._state  # discord.py's connection state: what ``send`` itself uses
        with handle_message_parameters(
            content=text,
            nonce=nonce,
            allowed_mentions=_NO_PINGS,
            previous_allowed_mentions=state.allowed_mentions,
            message_reference=reference.to_message_reference_dict() if reference else MISSING,
            mention_author=False if reference is not None else None,
        ) as params:
            assert params.payload is not None  # (no files: a JSON body)
            params.payload["enforce_nonce"] = True
            data = await state.http.send_message(channel.id, params=params)
        message = state.create_message(channel=channel, data=data)
        if message.content != text:  # Discord gave back the message it had: finish it
            message = await message.edit(content=text, allowed_mentions=_NO_PINGS)
        return message

    async def _follow_up(self, message_id: str, text: str) -> discord.Message | None:
        """Answer the pending slash command ``message_id`` with ``text``, if there is one
        that can still be answered (``None``: post to the channel instead)."""
        pending = self._pending.pop(message_id, None)
        if pending is None:
            return None
        interaction, deferred = pending
        if not await deferred or interaction.is_expired():
            return None
        try:
            followup: discord.Message = await interaction.followup.send(
                text, allowed_mentions=_NO_PINGS, wait=True
            )
        except discord.NotFound:  # the interaction is gone
            return None
        except (discord.HTTPException, aiohttp.ClientError, OSError):
            self._pending[message_id] = pending  # for a retry, or handled() takes it away
            raise
        return followup

    async def _retrying(self, request: Callable[[], Any], *, attempts: int = 5) -> Any:
        """``request()`` again after a 429 discord.py gave up on, or a 5xx / network blip."""
        for attempt in range(1, attempts + 1):
            try:
                return await request()
            except discord.HTTPException as exc:
                if attempt == attempts or not (exc.status == 429 or exc.status >= 500):
                    raise
            except (aiohttp.ClientError, OSError):
                if attempt == attempts:
                    raise
            await asyncio.sleep(min(0.5 * 2**attempt, 10.0))
        raise AssertionError("unreachable")


def _edit_with(message: discord.Message, text: str) -> Callable[[], Any]:
    return lambda: message.edit(content=text, allowed_mentions=_NO_PINGS)


def _tolerate_lone_surrogates() -> None:
    """Make discord.py read (and write) JSON holding lone surrogates (``"\\ud800"``).

    With orjson installed (turbobot depends on it) discord.py decodes every gateway
    frame with ``orjson.loads``, which refuses a lone surrogate escape: one such
    message would end the gateway connection, and the bot with it. The standard
    library's decoder accepts it, and the runtime then stores the text losslessly and
    shows the template U+FFFD (docs/architecture.md, "Input limits"). discord.py has
    no option for this, so its two module-level JSON functions get a fallback.
    """
    from discord import utils

    if getattr(utils._from_json, "_turbobot", False):
        return
    strict_loads, strict_dumps = utils._from_json, utils._to_json

    def loads(data: Any) -> Any:
        try:
            return strict_loads(data)
        except ValueError:  # orjson's JSONDecodeError is a ValueError
            return json.loads(data)

    def dumps(obj: Any) -> str:
        try:
            return strict_dumps(obj)
        except TypeError:  # orjson refuses str holding a lone surrogate
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)

    loads._turbobot = True  # type: ignore[attr-defined]
    utils._from_json = loads
    utils._to_json = dumps


def _raise_connection_error(connection: asyncio.Task[None]) -> None:
    """Why the gateway connection ended, as the error a user can act on."""
    exc = connection.exception()
    if exc is None:
        return
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        raise ConfigurationError(
            "Discord refused the Message Content intent: enable it in the Developer Portal "
            "(Applications > your app > Bot > Privileged Gateway Intents > Message Content "
            "Intent), then start the bot again"
        ) from exc
    if isinstance(exc, discord.LoginFailure):
        raise ConfigurationError("Discord refused the bot token: check DISCORD_BOT_TOKEN") from exc
    if isinstance(exc, discord.ConnectionClosed):
        raise ConfigurationError(
            f"Discord closed the gateway connection (code {exc.code}): {exc.reason or 'no reason'}"
        ) from exc
    # discord.py gives up on a gateway it never reached with an internal error
    # (AttributeError on a missing session): say what to check, not a traceback.
    raise ConfigurationError(
        f"the connection to the Discord gateway failed ({type(exc).__name__}): check the "
        "network and DISCORD_GATEWAY_URL"
    ) from exc


@contextlib.contextmanager
def _undeliverable() -> Iterator[None]:
    """Turn "this can never be sent" answers into :class:`UndeliverableError`."""
    try:
        yield
    except discord.Forbidden as exc:  # no permission to send here, DMs closed, blocked
        raise UndeliverableError(f"Discord refused: {exc.text or exc.status}") from exc
    except discord.NotFound as exc:  # the channel is gone
        raise UndeliverableError(f"Discord refused: {exc.text or exc.status}") from exc
    except discord.HTTPException as exc:
        if 400 <= exc.status < 500 and exc.status != 429:  # asking again cannot help
            raise UndeliverableError(
                f"Discord refused ({exc.status}, code {exc.code}): {exc.text}"
            ) from exc
        raise


def _in_server(message: discord.Message) -> bool:
    """Whether ``message`` was said in a server (see ``_guild_of``)."""
    return _guild_of(message) is not None


def _attachment_kind(attachment: discord.Attachment) -> str:
    kind = (attachment.content_type or "").partition("/")[0]
    return {"image": "photo", "audio": "audio", "video": "video"}.get(kind, "document")


def _readable_mentions(message: discord.Message, text: str) -> str:
    """``<@123>`` as ``@name`` for the model (it cannot read ids)."""
    names = {str(user.id): user.display_name for user in message.mentions}
    if not names:
        return text
    return re.sub(r"<@!?(\d+)>", lambda m: f"@{names[m[1]]}" if m[1] in names else m[0], text)


def _parts(text: str, *, preview: bool = False) -> list[str]:
    """A reply as messages of at most 2,000 characters; a preview ends in " …", after
    the code block it is in (closed for the preview) rather than inside it."""
    if not preview:
        return split_markdown(text, MESSAGE_LIMIT)
    parts = split_markdown(text, MESSAGE_LIMIT - len(_OPEN_CODE_MORE))
    if not parts:
        return []
    last = parts[-1]
    # as Discord reads code: each ``` opens a block the next closes (split_markdown
    # closes and reopens the blocks it cuts, so a part's fences pair up but the last's)
    more = _OPEN_CODE_MORE if last.count("```") % 2 else " …"
    return [*parts[:-1], last + more]


def settings_from(launch: Launch) -> DiscordSettings:
    """Adapter settings from ``turbobot run``'s flags and ``DISCORD_*`` variables (flags win)."""
    args, env = launch.args, launch.env
    shard_count = args.shard_count
    if shard_count is None and env.get("DISCORD_SHARD_COUNT"):
        shard_count = _integer(env["DISCORD_SHARD_COUNT"], "DISCORD_SHARD_COUNT")
    shard_ids = args.shard_ids or env.get("DISCORD_SHARD_IDS") or None
    source = "--shard-ids" if args.shard_ids else "DISCORD_SHARD_IDS"
    threads = args.threads or env.get("DISCORD_THREADS", "").lower() in ("1", "true", "yes")
    return DiscordSettings(
        token=env.get("DISCORD_BOT_TOKEN", "").strip(),
        api_base_url=env.get("DISCORD_API_BASE_URL") or None,
        gateway_url=env.get("DISCORD_GATEWAY_URL") or None,
        # checked by DiscordSettings, which names the valid values
        respond=args.respond or env.get("DISCORD_RESPOND") or "mention",  # type: ignore[arg-type]
        trigger=args.trigger or env.get("DISCORD_TRIGGER") or None,
        group_mode=args.group_mode or env.get("DISCORD_GROUP_MODE") or "per-user",  # type: ignore[arg-type]
        threads=threads,
        shard_count=shard_count,
        shard_ids=_shard_ids(shard_ids, source) if shard_ids else None,
    )


def _integer(text: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"{source} must be a whole number, not {text!r}") from None


def _shard_ids(text: str, source: str) -> tuple[int, ...]:
    """``0,2,4`` or ``0-3`` (or both mixed) as shard ids."""
    ids: list[int] = []
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ConfigurationError(
                f"{source} must list shard numbers like 0,1 or 0-3, not {text!r}"
            )
        if dash and int(high) < int(low):
            raise ConfigurationError(f"{source}: the range {item.strip()} is backwards")
        ids.extend(range(int(low), int(high) + 1) if dash else [int(low)])
    return tuple(dict.fromkeys(ids))


async def run_platform(launch: Launch) -> None:
    """``turbobot run --platform discord``: the gateway, until SIGINT/SIGTERM."""
    adapter = DiscordAdapter(settings_from(launch))
    await serve(launch, adapter, "{username} (Discord)")


def _guild_of(message: discord.Message) -> str | None:
    """The server ``message`` was sent in, if any (also one discord.py has not cached:
    its channel is then a partial one that knows only the server's id)."""
    guild_id = message.guild.id if message.guild is not None else None
    if guild_id is None:
        guild_id = getattr(message.channel, "guild_id", None)
    return None if guild_id is None else str(guild_id)


def _nonce(reply: str, part: int) -> str:
    """The nonce of a reply's ``part``-th message: the same for every try, 24 characters
    (Discord takes at most 25)."""
    return hashlib.blake2b(f"{reply}:{part}".encode(), digest_size=12).hexdigest()
