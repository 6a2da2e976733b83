"""The Telegram adapter, on python-telegram-bot (extra ``telegram``).

Updates come by long polling (default) or by webhook. Either way an update is
acknowledged to Telegram only after its message is committed to the inbox: polling
asks for the next page (which confirms the previous one) once a page is committed,
and the webhook answers 200 once the message is committed. A crash in between
means Telegram delivers the update again and the inbox drops the duplicate, so no
message is lost or handled twice.

Replies: Markdown from the model is sent as plain text plus entities (it cannot fail
to parse), split at 4,096 characters; if Telegram rejects the entities anyway the
part is sent as plain text. Streaming replies grow in a draft (private chats, Bot
API 9.5+) or in a message edited about once a second, and always end as the complete
text. A 429 makes only the chat concerned wait; all chats together stay under about
30 messages a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import random
import re
import signal
import socket
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from turbobot.adapters._common import (
    RateLimiter,
    RedactSecrets,
    guard_logs,
    platform_id,
    serve,
)
from turbobot.chat import Attachment, ChannelKey, IncomingMessage
from turbobot.commands import parse_command
from turbobot.exceptions import ConfigurationError, UndeliverableError
from turbobot.formatting import FormattedText, parse_markdown, split_formatted, utf16_len
from turbobot.runtime import BaseSender, Runtime
from turbobot.template import INTERRUPTED, AssistantStream

if TYPE_CHECKING:
    from turbobot.platforms import Launch

# Opt in to PTB's future behaviour (time periods as timedelta) now: otherwise PTB warns
# on every 429 it parses. The code below reads both forms.
os.environ.setdefault("PTB_TIMEDELTA", "true")

try:
    from telegram import Bot, ChatMember, Message, MessageEntity, Update
    from telegram.constants import ChatAction, ChatType, MessageEntityType
    from telegram.error import (
        BadRequest,
        Conflict,
        Forbidden,
        InvalidToken,
        NetworkError,
        RetryAfter,
        TelegramError,
    )
    from telegram.ext import Application, ApplicationBuilder
    from telegram.request import BaseRequest, HTTPXRequest
    from telegram.warnings import PTBDeprecationWarning
except ImportError as exc:  # pragma: no cover - exercised through the CLI message
    raise ConfigurationError(
        "the Telegram adapter needs python-telegram-bot: run `make install` or "
        "`pip install 'turbobot[telegram]'`"
    ) from exc

__all__ = ["GroupMode", "TelegramAdapter", "TelegramSettings", "run_platform", "settings_from"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Telegram's limit for one message, in UTF-16 code units after entity parsing
MESSAGE_LIMIT = 4096
_UPDATES = ["message", "edited_message"]
_MEDIA = (
    "photo",
    "sticker",
    "voice",
    "audio",
    "video",
    "video_note",
    "animation",
    "document",
    "location",
    "contact",
    "poll",
    "dice",
    "venue",
    "game",
    "story",
    "paid_media",
)
#: concurrent Bot API requests (and HTTP connections)
_IN_FLIGHT = 16
#: seconds to take a streaming preview away when a stop abandons its step
_CLEANUP_TIMEOUT = 3.0
_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")
GroupMode = Literal["per-user", "shared"]


@dataclass(frozen=True, slots=True)
class TelegramSettings:
    """How the Telegram adapter connects and behaves.

    Args:
        token: the bot token from @BotFather (never logged).
        base_url: a self-hosted or test Bot API server in PTB's form
            (``http://host:port/bot``; the token is appended).
        webhook_url: receive updates by webhook at this public URL instead of polling.
        listen, port: where the webhook server listens.
        secret_token: required with a webhook; requests without it are refused (403).
        group_mode: ``per-user`` (each member of a group has their own conversation)
            or ``shared`` (one conversation per group, messages prefixed with the speaker).
        trigger: in groups, a word that also addresses the bot (besides a mention, a
            reply to the bot and a command).
        drafts: stream into a message draft in private chats when the server has it.
        stream_interval: seconds between updates of a streaming reply in one chat.
        rate: messages per second across all chats (Telegram allows about 30).
        poll_timeout: seconds a getUpdates long poll may wait.
    """

    token: str
    base_url: str | None = None
    base_file_url: str | None = None
    webhook_url: str | None = None
    listen: str = "0.0.0.0"
    port: int = 8443
    secret_token: str | None = None
    group_mode: GroupMode = "per-user"
    trigger: str | None = None
    drafts: bool = True
    stream_interval: float = 1.0
    rate: float = 30.0
    poll_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigurationError(
                "TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather and set "
                "TELEGRAM_BOT_TOKEN (in the environment or a .env file)"
            )
        if self.webhook_url is not None:
            if not urlsplit(self.webhook_url).scheme.startswith("http"):
                # not echoed: a webhook URL often carries the token in its path
                raise ConfigurationError("the webhook URL must start with https:// (or http://)")
            if not self.secret_token or not _SECRET.fullmatch(self.secret_token):
                raise ConfigurationError(
                    "a webhook needs a secret token (1-256 characters A-Z, a-z, 0-9, _ "
                    "and -): set TELEGRAM_WEBHOOK_SECRET"
                )
        if self.group_mode not in ("per-user", "shared"):
            raise ConfigurationError(
                f"group mode {self.group_mode!r} is not 'per-user' or 'shared'"
            )

    def __repr__(self) -> str:  # the token and the secret never reach a log
        return (
            f"TelegramSettings(base_url={self.base_url!r}, webhook_url={self.webhook_url!r}, "
            f"group_mode={self.group_mode!r})"
        )


def _retry_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _not_modified(exc: BadRequest) -> bool:
    return "not modified" in exc.message.lower()


class TelegramAdapter(BaseSender):
    """Runs a :class:`~turbobot.runtime.Runtime` as a Telegram bot.

    Use it as an async context manager (it initializes the bot: ``getMe``), then
    ``await adapter.run(runtime)`` until :meth:`stop` (or SIGINT/SIGTERM).
    """

    def __init__(
        self,
        settings: TelegramSettings,
        *,
        requests: tuple[BaseRequest, BaseRequest] | None = None,
    ) -> None:
        """``requests``: the transports for Bot API calls and for getUpdates (default:
        httpx, the right pool sizes); the benchmark passes in-process ones."""
        self.settings = settings
        self._redact = RedactSecrets(settings.token, settings.secret_token or "")
        # before PTB logs its URLs (they contain the token); httpx logs every URL at INFO
        guard_logs(self._redact, quiet=("httpx", "httpcore"))
        # Our own request objects, so they can be closed even when getMe fails (PTB
        # only closes them after a successful initialize).
        self._requests = requests or (
            HTTPXRequest(connection_pool_size=_IN_FLIGHT),
            HTTPXRequest(connection_pool_size=1, read_timeout=10.0),  # getUpdates
        )
        builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any] = (
            ApplicationBuilder()
            .token(settings.token)
            .updater(None)
            .request(self._requests[0])
            .get_updates_request(self._requests[1])
        )
        if settings.base_url:
            builder = builder.base_url(settings.base_url)
            base = settings.base_url
            derived = base[: -len("/bot")] + "/file/bot" if base.endswith("/bot") else base
            builder = builder.base_file_url(settings.base_file_url or derived)
        self.application: Application[Any, Any, Any, Any, Any, Any] = builder.build()
        self._limiter = RateLimiter(settings.rate, burst=max(1, int(settings.rate)))
        # httpcore's pool scans every queued request against every connection: keeping
        # the queue within the pool keeps a backlog of replies from costing O(n^2).
        self._in_flight = asyncio.Semaphore(_IN_FLIGHT)
        self._drafts = settings.drafts
        self._stopping = asyncio.Event()
        self.username: str | None = None
        self.bot_id: int | None = None

    @property
    def bot(self) -> Bot:
        bot: Bot = self.application.bot
        return bot

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> TelegramAdapter:
        try:
            await self.application.initialize()  # getMe
        except BaseException as exc:
            for request in self._requests:
                await request.shutdown()
            if isinstance(exc, InvalidToken):
                raise ConfigurationError(
                    "Telegram refused the bot token (401 Unauthorized): check "
                    "TELEGRAM_BOT_TOKEN (and TELEGRAM_API_BASE_URL if you set one)"
                ) from exc
            if isinstance(exc, NetworkError):
                raise ConfigurationError(
                    f"cannot reach the Telegram Bot API ({type(exc).__name__}): check the "
                    "network and TELEGRAM_API_BASE_URL"
                ) from exc
            raise
        self.username = self.bot.username
        self.bot_id = self.bot.id
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.application.shutdown()
        for request in self._requests:
            await request.shutdown()

    def stop(self) -> None:
        """Stop receiving; :meth:`run` returns once what was received is committed."""
        self._stopping.set()

    async def run(self, runtime: Runtime, *, handle_signals: bool = True) -> None:
        """Receive updates (polling or webhook) and hand them to ``runtime`` until stopped."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self.stop)
        try:
            await self._announce_commands(runtime)
            if self.settings.webhook_url:
                await self._run_webhook(runtime)
            else:
                await self._run_polling(runtime)
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)

    async def _announce_commands(self, runtime: Runtime) -> None:
        """List the runtime's commands in Telegram's command menu (best effort)."""
        try:
            menu = runtime.commands.menu()
            await self._call(partial(self.bot.set_my_commands, menu), attempts=2)
        except TelegramError as exc:
            _log.warning("Telegram: could not set the command menu (%s)", exc)

    # -- polling ----------------------------------------------------------------------

    async def _run_polling(self, runtime: Runtime) -> None:
        await self._call(lambda: self.bot.delete_webhook(drop_pending_updates=False))
        offset: int | None = None
        delay = 1.0
        while not self._stopping.is_set():
            poll = asyncio.ensure_future(self._get_updates(offset))
            stopping = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([poll, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not poll.done():
                poll.cancel()  # nothing of this poll was handled: Telegram sends it again
                with contextlib.suppress(asyncio.CancelledError, TelegramError):
                    await poll
                break
            try:
                updates = poll.result()
            except RetryAfter as exc:
                await self._pause(_retry_seconds(exc))
                continue
            except Conflict:
                _log.error(
                    "Telegram: another getUpdates or a webhook is active for this bot; "
                    "retrying (stop the other instance)"
                )
                await self._pause(delay)
                delay = min(delay * 2, 30.0)
                continue
            except InvalidToken as exc:
                raise ConfigurationError("Telegram refused the bot token while polling") from exc
            except TelegramError as exc:  # network blips, a proxy's error page, a 5xx
                _log.warning("Telegram: getUpdates failed (%s); retrying", exc)
                await self._pause(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            await self._receive_raw(runtime, updates)
            ids = [u["update_id"] for u in updates if type(u.get("update_id")) is int]
            if ids:
                offset = max(ids) + 1
        if offset is not None:
            # Confirm the last page, so a restart does not fetch it again.
            with contextlib.suppress(TelegramError):
                await self._get_updates(offset, wait=0)

    async def _get_updates(self, offset: int | None, *, wait: int | None = None) -> list[Any]:
        """``getUpdates`` as Telegram's JSON: ``bot.get_updates`` builds a PTB
        ``Update`` of every update, which cost more than the rest of a message's way
        through turbobot (docs/architecture.md, "Reading updates"). PTB's ``_post``
        still makes the request and turns Telegram's errors into its exceptions."""
        if wait is None:
            wait = max(1, int(self.settings.poll_timeout))
        read_timeout = (self._requests[1].read_timeout or 0) + wait
        params = {"offset": offset, "timeout": wait, "allowed_updates": _UPDATES}
        result = await self.bot._post("getUpdates", params, read_timeout=read_timeout)
        if not isinstance(result, list):
            raise TelegramError("getUpdates answered something that is not a list")
        return [u for u in result if isinstance(u, dict)]

    async def _receive_raw(self, runtime: Runtime, updates: Sequence[Mapping[str, Any]]) -> None:
        messages = [m for m in map(self._convert_raw, updates) if m is not None]
        # The page is committed in one transaction, a chat's messages in their order.
        await runtime.receive_many(messages)

    async def _receive_all(self, runtime: Runtime, updates: Sequence[Update]) -> None:
        """The same for updates PTB has built (the path before raw reading; the
        benchmark compares the two)."""
        messages = [m for m in map(self._convert, updates) if m is not None]
        await runtime.receive_many(messages)

    # -- webhook ----------------------------------------------------------------------

    async def _run_webhook(self, runtime: Runtime) -> None:
        from tornado.httpserver import HTTPServer
        from tornado.web import Application as WebApplication

        settings = self.settings
        assert settings.webhook_url is not None and settings.secret_token is not None
        path = urlsplit(settings.webhook_url).path or "/"
        handler = _make_webhook_handler()
        web = WebApplication([(re.escape(path), handler, {"adapter": self, "runtime": runtime})])
        try:
            # Workers sharing a database share the port too (the kernel spreads the
            # connections; see turbobot.workers). One process alone owns it.
            shared = runtime.store.leases is not None and hasattr(socket, "SO_REUSEPORT")
            listening = socket.create_server(
                (settings.listen, settings.port), backlog=128, reuse_port=shared
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot listen for the webhook on {settings.listen}:{settings.port} "
                f"({exc.strerror}): choose another --port or --listen address"
            ) from exc
        listening.setblocking(False)
        server = HTTPServer(web)
        server.add_sockets([listening])
        try:
            await self._call(
                lambda: self.bot.set_webhook(
                    url=settings.webhook_url or "",
                    secret_token=settings.secret_token,
                    allowed_updates=_UPDATES,
                )
            )
            _log.info(
                "Telegram: webhook set; listening on %s:%s%s", settings.listen, settings.port, path
            )
            await self._stopping.wait()
        finally:
            # The webhook stays set: Telegram keeps updates while the bot is down.
            server.stop()
            await server.close_all_connections()

    def secret_matches(self, given: str | None) -> bool:
        expected = self.settings.secret_token or ""
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())

    # -- incoming ---------------------------------------------------------------------

    def _convert_raw(self, data: Mapping[str, Any]) -> IncomingMessage | None:
        """:meth:`to_incoming` of the update ``data`` (Telegram's JSON): read directly
        where :func:`read_private` can, else through PTB's ``Update``."""
        try:
            try:
                return read_private(data)
            except NotPlain:
                update = Update.de_json(dict(data), self.bot)
        except Exception:  # raising would stop the bot, and Telegram would resend it
            _log.exception(
                "Telegram: skipped update %r: it could not be read", data.get("update_id")
            )
            return None
        return self._convert(update)

    def _convert(self, update: Update) -> IncomingMessage | None:
        """:meth:`to_incoming`, except that an update it cannot read is logged and skipped
        (raising would stop the bot, and Telegram would send the same update again)."""
        try:
            return self.to_incoming(update)
        except Exception:
            _log.exception("Telegram: skipped update %s: it could not be read", update.update_id)
            return None

    def to_incoming(self, update: Update) -> IncomingMessage | None:
        """The platform-neutral message for ``update``, or ``None`` if it is not for the bot.

        Edits are not new input (the original was handled); channel posts and other
        update kinds are ignored; messages from bots are marked so the runtime ignores them.
        """
        message = update.message
        if message is None:
            if update.edited_message is not None:
                _log.debug("Telegram: ignoring an edited message (edits are not new input)")
            return None
        chat = message.chat
        user = message.from_user
        text = message.text if message.text is not None else (message.caption or "")
        entities = message.entities if message.text is not None else message.caption_entities
        thread = (
            str(message.message_thread_id)
            if message.is_topic_message and message.message_thread_id
            else None
        )
        attachments = tuple(Attachment(kind) for kind in _MEDIA if getattr(message, kind))
        if not text.strip() and not attachments:
            return None  # a service message (member joined, pinned, timer...): not for us
        if message.sender_chat is not None:
            # An anonymous group admin (from = GroupAnonymousBot) or a linked channel:
            # a person speaking as the chat, not a bot.
            author_id = str(message.sender_chat.id)
            author_name = message.sender_chat.title or author_id
            is_bot = False
        elif user is not None:
            author_id, author_name, is_bot = str(user.id), user.full_name, user.is_bot
        else:
            return None
        if chat.type == ChatType.PRIVATE:
            key = ChannelKey("telegram", str(chat.id), thread)
        elif chat.type in (ChatType.GROUP, ChatType.SUPERGROUP):
            addressed, text = self._addressed(message, text, entities)
            if not addressed:
                return None
            if self.settings.group_mode == "shared":
                key = ChannelKey("telegram", str(chat.id), thread)
                if text.strip() and parse_command(text, self.username) is None:
                    text = f"{author_name}: {text}"
            else:
                key = ChannelKey("telegram", str(chat.id), thread, author_id)
        else:
            return None
        reply = message.reply_to_message
        return IncomingMessage(
            key=key,
            text=text,
            message_id=str(message.message_id),
            author_id=author_id,
            author_name=author_name,
            timestamp=message.date.timestamp(),
            attachments=attachments,
            is_bot=is_bot,
            reply_to=str(reply.message_id) if reply is not None else None,
        )

    def _addressed(
        self, message: Message, text: str, entities: Sequence[MessageEntity]
    ) -> tuple[bool, str]:
        """Whether a group message is for the bot, and its text without the mention."""
        username = (self.username or "").lower()
        addressed = False
        mentions: list[tuple[int, int]] = []  # spans of "@bot" in ``text``
        for entity in entities:
            if entity.type == MessageEntityType.MENTION:
                start, end = _python_span(text, entity.offset, entity.length)
                if text[start:end].lower() == f"@{username}":
                    mentions.append((start, end))
            elif entity.type == MessageEntityType.TEXT_MENTION and entity.user is not None:
                addressed = addressed or entity.user.id == self.bot_id
        if mentions:
            addressed = True
            rest = text
            for start, end in sorted(mentions, reverse=True):
                rest = rest[:start] + rest[end:]
            rest = re.sub(r"[ \t]{2,}", " ", rest).strip()
            text = rest or text  # a bare "@bot" stays as it is: it is what they said
        if text.startswith("/"):
            word = text[1:].split(maxsplit=1)[0] if text[1:].strip() else ""
            target = word.partition("@")[2].lower()
            if not target or target == username:
                addressed = True
        reply = message.reply_to_message
        if (
            reply is not None
            and reply.from_user is not None
            and reply.from_user.id == self.bot_id
            and reply.forum_topic_created is None  # in a topic the bot opened, everything is
        ):
            addressed = True
        trigger = self.settings.trigger
        if trigger and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text, re.I):
            addressed = True
        return addressed, text

    # -- sending (BaseSender) ---------------------------------------------------------

    @staticmethod
    def _target(key: ChannelKey) -> tuple[int, int | None]:
        return int(key.channel), int(key.thread) if key.thread else None

    async def send(self, key: ChannelKey, text: str) -> str | None:
        chat_id, thread = self._target(key)
        with _undeliverable():
            ids = [await self._send_part(chat_id, thread, part) for part in _parts(text)]
        return platform_id(ids)

    async def is_admin(self, key: ChannelKey, user_id: str) -> bool:
        """The chat's owner and administrators, as ``getChatMember`` says (asked only
        when someone other than a conversation's starter sends ``/reset``)."""
        chat_id, _ = self._target(key)
        member = await self.bot.get_chat_member(chat_id, int(user_id))
        return member.status in (ChatMember.OWNER, ChatMember.ADMINISTRATOR)

    async def typing(self, key: ChannelKey) -> None:
        chat_id, thread = self._target(key)
        # Only with spare capacity: a backlog of replies must not turn into a flood of
        # typing indicators, nor wait behind them.
        if self._limiter.try_acquire():
            async with self._in_flight:
                await self.bot.send_chat_action(
                    chat_id, ChatAction.TYPING, message_thread_id=thread
                )

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        chat_id, thread = self._target(key)
        with _undeliverable():
            if self._drafts and chat_id > 0:  # private chats have positive ids
                return await self._stream_draft(key, chat_id, thread, stream)
            return await self._stream_edits(chat_id, thread, stream)

    async def _stream_draft(
        self, key: ChannelKey, chat_id: int, thread: int | None, stream: AssistantStream
    ) -> str | None:
        draft_id = random.randint(1, 2**31 - 1)
        text = ""
        next_at = 0.0
        async for delta in stream:
            text += delta
            if time.monotonic() < next_at or not text.strip():
                continue
            next_at = time.monotonic() + self.settings.stream_interval
            preview = _preview(text)
            try:
                await self._call(
                    partial(
                        self.bot.send_message_draft,
                        chat_id,
                        draft_id,
                        preview,
                        message_thread_id=thread,
                    ),
                    attempts=1,
                )
            except RetryAfter as exc:
                next_at = time.monotonic() + _retry_seconds(exc)
            except (BadRequest, InvalidToken) as exc:
                # A 404 (InvalidToken in PTB): a Bot API server without drafts, for every
                # chat. A 400: no drafts in this chat. Either way, edits take over.
                _log.info("Telegram: no message drafts here (%s); editing messages instead", exc)
                if isinstance(exc, InvalidToken):
                    self._drafts = False
                return await self._stream_edits(chat_id, thread, stream, text)
            except TelegramError as exc:  # a blip: the next draft or the final send catches up
                _log.debug("Telegram: a streaming draft failed: %s", exc)
        if stream.interrupted:
            return None  # a draft vanishes by itself: nothing of the broken-off part stays
        return await self.send(key, stream.text) if stream.text.strip() else None

    async def _stream_edits(
        self, chat_id: int, thread: int | None, stream: AssistantStream, text: str = ""
    ) -> str | None:
        """Show the reply in a message edited as it grows; ``text``: what came already."""
        previews: list[int] = []  # the message showing it, once there is one
        try:
            return await self._edits(chat_id, thread, stream, text, previews)
        except asyncio.CancelledError:
            # A stop outlasted its grace and abandoned the step: it is done again on the
            # next start, whole. The preview goes, so the reply is not read twice.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(_CLEANUP_TIMEOUT):
                    for message_id in previews:
                        await self.bot.delete_message(chat_id, message_id)
            raise

    async def _edits(
        self,
        chat_id: int,
        thread: int | None,
        stream: AssistantStream,
        text: str,
        previews: list[int],
    ) -> str | None:
        message_id: int | None = None
        shown = ""
        next_at = time.monotonic() + self.settings.stream_interval / 2
        async for delta in stream:
            text += delta
            if time.monotonic() < next_at:
                continue
            preview = _preview(text)
            if not preview.strip() or preview == shown:
                continue
            next_at = time.monotonic() + self.settings.stream_interval
            try:
                if message_id is None:
                    sent = await self._call(
                        partial(self.bot.send_message, chat_id, preview, message_thread_id=thread),
                        attempts=1,
                    )
                    message_id = sent.message_id
                    previews.append(message_id)
                else:
                    await self._call(
                        partial(
                            self.bot.edit_message_text,
                            preview,
                            chat_id=chat_id,
                            message_id=message_id,
                        ),
                        attempts=1,
                    )
                shown = preview
            except RetryAfter as exc:  # skip updates until then; the final text catches up
                next_at = time.monotonic() + _retry_seconds(exc)
            except TelegramError as exc:  # previews are best effort; the final text is not
                if not (isinstance(exc, BadRequest) and _not_modified(exc)):
                    _log.debug("Telegram: a streaming preview failed: %s", exc)
        if stream.interrupted:
            # The generation broke off: what is on screen stays, marked as interrupted.
            if message_id is None:
                return None
            marked = _preview(text)[: MESSAGE_LIMIT - 2 * len(INTERRUPTED)] + INTERRUPTED
            with contextlib.suppress(TelegramError):
                await self._call(
                    partial(
                        self.bot.edit_message_text, marked, chat_id=chat_id, message_id=message_id
                    )
                )
            return str(message_id)
        parts = _parts(stream.text)
        if not parts:
            if message_id is not None:  # nothing to show after all: take the preview away
                with contextlib.suppress(TelegramError):
                    await self._call(partial(self.bot.delete_message, chat_id, message_id))
            return None
        if message_id is None:
            ids = [await self._send_part(chat_id, thread, part) for part in parts]
        else:
            await self._edit_part(chat_id, message_id, parts[0])
            ids = [str(message_id)]
            ids += [await self._send_part(chat_id, thread, part) for part in parts[1:]]
        return platform_id(ids)

    async def _send_part(self, chat_id: int, thread: int | None, part: FormattedText) -> str:
        message: Mapping[str, Any] = await self._formatted(
            part, partial(self._send_message, chat_id, part.text, thread)
        )
        return str(message["message_id"])

    async def _send_message(
        self, chat_id: int, text: str, thread: int | None, *, entities: list[MessageEntity] | None
    ) -> Mapping[str, Any]:
        """``sendMessage``, with Telegram's answer as JSON: ``bot.send_message`` builds a
        PTB ``Message`` of it, of which the bot reads only the id."""
        params = {
            "chat_id": chat_id,
            "text": text,
            "message_thread_id": thread,
            "entities": entities,
        }
        result = await self.bot._post("sendMessage", params)
        if not isinstance(result, dict) or type(result.get("message_id")) is not int:
            raise TelegramError("sendMessage answered without a message id")
        return result

    async def _edit_part(self, chat_id: int, message_id: int, part: FormattedText) -> None:
        edit = partial(
            self.bot.edit_message_text, part.text, chat_id=chat_id, message_id=message_id
        )
        try:
            await self._formatted(part, edit)
        except BadRequest as exc:
            if not _not_modified(exc):
                raise

    async def _formatted(self, part: FormattedText, request: Callable[..., Awaitable[_T]]) -> _T:
        """``request(entities=...)`` with the part's formatting; if Telegram refuses the
        formatting, once more as plain text (a reply is never lost to formatting)."""
        entities = _entities(part)
        try:
            return await self._call(partial(request, entities=entities or None))
        except BadRequest as exc:
            if not entities or _not_modified(exc):
                raise
            _log.warning("Telegram: formatting refused (%s); sending the part as plain text", exc)
        return await self._call(partial(request, entities=None))

    async def _call(self, request: Callable[[], Awaitable[_T]], *, attempts: int = 5) -> _T:
        """Run one Bot API request under the global rate, waiting out 429s and blips.

        A 429 makes only this caller wait (other chats go on). With ``attempts=1`` the
        first error is raised (previews and typing are not worth waiting for).
        """
        for attempt in range(1, attempts + 1):
            await self._limiter.acquire()
            try:
                async with self._in_flight:
                    return await request()
            except RetryAfter as exc:
                if attempt == attempts or await self._pause(_retry_seconds(exc)):
                    raise  # when stopping, the reply stays in the outbox for the next start
            except (BadRequest, Forbidden, InvalidToken, Conflict):
                raise  # the request itself is wrong: repeating it cannot help
            except NetworkError:
                if attempt == attempts or await self._pause(min(0.5 * 2**attempt, 10.0)):
                    raise
        raise AssertionError("unreachable")

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short by :meth:`stop`; whether the adapter is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()


def _make_webhook_handler() -> type:
    from tornado.web import RequestHandler

    class WebhookHandler(RequestHandler):
        """Answers 200 only after the update's message is committed (else Telegram resends)."""

        def initialize(self, adapter: TelegramAdapter, runtime: Runtime) -> None:
            self.adapter = adapter
            self.runtime = runtime

        async def post(self) -> None:
            header = self.request.headers.get("X-Telegram-Bot-Api-Secret-Token")
            if not self.adapter.secret_matches(header):
                _log.warning("Telegram webhook: refused a request without the right secret")
                self.set_status(403)
                return
            try:
                data = json.loads(self.request.body)
                if not isinstance(data, dict) or type(data.get("update_id")) is not int:
                    raise TypeError("not an update")
            except (ValueError, TypeError) as exc:
                _log.warning("Telegram webhook: malformed update (%s)", type(exc).__name__)
                self.set_status(400)
                return
            message = self.adapter._convert_raw(data)
            if message is not None:
                await self.runtime.receive(message)
            self.set_status(200)

    return WebhookHandler


class NotPlain(Exception):
    """An update :func:`read_private` leaves to python-telegram-bot."""


def read_private(update: Mapping[str, Any]) -> IncomingMessage | None:
    """What :meth:`TelegramAdapter.to_incoming` gives for ``update`` (Telegram's JSON),
    without building PTB objects: for messages in private chats, edits and update kinds
    the bot ignores. Group messages (mentions, entities, replies to the bot) and anything
    not shaped as the Bot API documents raise :class:`NotPlain`: PTB reads those."""
    message = update.get("message")
    if message is None:
        if "edited_message" in update:
            _log.debug("Telegram: ignoring an edited message (edits are not new input)")
        return None  # edits, channel posts, callbacks...: not input
    if type(message) is not dict:
        raise NotPlain
    chat = message.get("chat")
    if type(chat) is not dict or chat.get("type") != "private":
        raise NotPlain  # groups: PTB reads the entities; a malformed chat: PTB says why
    text = message.get("text")
    if text is None:
        text = message.get("caption") or ""
    if type(text) is not str:
        raise NotPlain
    attachments = tuple(Attachment(kind) for kind in _MEDIA if message.get(kind))
    if not text.strip() and not attachments:
        return None  # a service message: not for us
    sender_chat = message.get("sender_chat")
    user = message.get("from")
    if sender_chat is not None:
        raise NotPlain  # (never in a private chat)
    if user is None:
        return None
    if type(user) is not dict:
        raise NotPlain
    user_id, first, last, is_bot = (
        user.get("id"),
        user.get("first_name"),
        user.get("last_name"),
        user.get("is_bot"),
    )
    chat_id, message_id, date = chat.get("id"), message.get("message_id"), message.get("date")
    thread = message.get("message_thread_id") if message.get("is_topic_message") else None
    reply = message.get("reply_to_message")
    if (
        type(user_id) is not int
        or type(chat_id) is not int
        or type(message_id) is not int
        or type(date) is not int
        or type(first) is not str
        or (last is not None and type(last) is not str)
        or type(is_bot) is not bool
        or (thread is not None and type(thread) is not int)
        or (
            reply is not None
            and (type(reply) is not dict or type(reply.get("message_id")) is not int)
        )
    ):
        raise NotPlain
    return IncomingMessage(
        key=ChannelKey("telegram", str(chat_id), str(thread) if thread else None),
        text=text,
        message_id=str(message_id),
        author_id=str(user_id),
        author_name=f"{first} {last}" if last else first,
        timestamp=float(date),
        attachments=attachments,
        is_bot=is_bot,
        reply_to=str(reply["message_id"]) if reply is not None else None,
    )


@contextlib.contextmanager
def _undeliverable() -> Iterator[None]:
    """Turn "this can never be sent" answers into :class:`UndeliverableError`."""
    try:
        yield
    except Forbidden as exc:  # blocked by the user, kicked from the group
        raise UndeliverableError(f"Telegram refused: {exc.message}") from exc
    except BadRequest as exc:
        if "chat not found" in exc.message.lower():
            raise UndeliverableError(f"Telegram refused: {exc.message}") from exc
        raise


def _python_span(text: str, offset: int, length: int) -> tuple[int, int]:
    """Python indices for a UTF-16 span (Telegram's entity offsets)."""
    units = 0
    start = end = len(text)
    for index, ch in enumerate(text):
        if units == offset:
            start = index
        if units == offset + length:
            end = index
            break
        units += 2 if ord(ch) > 0xFFFF else 1
    return start, end


def _entities(part: FormattedText) -> list[MessageEntity]:
    text = part.text
    result = []
    for entity in part.entities:
        offset = utf16_len(text[: entity.offset])
        length = utf16_len(text[entity.offset : entity.offset + entity.length])
        result.append(
            MessageEntity(entity.kind, offset, length, url=entity.url, language=entity.language)
        )
    return result


def _parts(text: str) -> list[FormattedText]:
    """A reply as messages: its Markdown as entities, split at Telegram's limit. Text
    whose markup leaves nothing visible (an empty code block) goes as written."""
    return split_formatted(
        parse_markdown(text), MESSAGE_LIMIT, measure=utf16_len
    ) or split_formatted(FormattedText(text), MESSAGE_LIMIT, measure=utf16_len)


def _preview(text: str) -> str:
    """What a streaming preview shows: the start of the reply, within one message."""
    if utf16_len(text) <= MESSAGE_LIMIT:
        return text
    parts = split_formatted(FormattedText(text), MESSAGE_LIMIT - 2, measure=utf16_len)
    return parts[0].text + " …" if parts else ""


def settings_from(launch: Launch) -> TelegramSettings:
    """Adapter settings from ``turbobot run``'s flags and ``TELEGRAM_*`` variables (flags win)."""
    args, env = launch.args, launch.env
    mode = args.group_mode or env.get("TELEGRAM_GROUP_MODE") or "per-user"
    return TelegramSettings(
        token=env.get("TELEGRAM_BOT_TOKEN", ""),
        base_url=env.get("TELEGRAM_API_BASE_URL") or None,
        base_file_url=env.get("TELEGRAM_API_FILE_URL") or None,
        webhook_url=args.webhook_url or env.get("TELEGRAM_WEBHOOK_URL") or None,
        listen=args.listen,
        port=args.port,
        secret_token=env.get("TELEGRAM_WEBHOOK_SECRET") or None,
        # checked by TelegramSettings, which names the valid modes
        group_mode=mode,  # type: ignore[arg-type]
        trigger=env.get("TELEGRAM_TRIGGER") or None,
        rate=_positive(env, "TELEGRAM_RATE", 30.0),
    )


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name) or default)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigurationError(f"{name} must be a positive number, not {env.get(name)!r}")
    return value


async def run_platform(launch: Launch) -> None:
    """``turbobot run --platform telegram``: polling or a webhook, until SIGINT/SIGTERM."""
    await serve(launch, TelegramAdapter(settings_from(launch)), "@{username}")
