"""A fake Telegram Bot API server on 127.0.0.1, for end-to-end tests with the real PTB.

Point python-telegram-bot at it with::

    fake = await FakeTelegram().start()
    app = (
        ApplicationBuilder()
        .token(fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .build()
    )

Feed updates with :meth:`FakeTelegram.message` (or :meth:`FakeTelegram.push` for any
update dict); they are served by long-polling ``getUpdates`` or, once a webhook is set,
POSTed to it with :meth:`FakeTelegram.deliver`. Every API call is recorded in ``calls``;
messages the bot sends (and their edits) are kept in ``messages``. Errors are injected
with :meth:`FakeTelegram.fail` and per-chat flood limits with
:meth:`FakeTelegram.limit_edits`.

Text is checked the way Telegram does it, approximately: empty and over-long texts are
refused, and ``parse_mode`` markup (HTML, MarkdownV2, legacy Markdown) must parse, else
the call answers 400 "Bad Request: can't parse entities: ...". The parsed text and its
entities are what the returned Message objects carry, as with the real API.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import inspect
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

DEFAULT_TOKEN = "123456:TEST-token"
MAX_TEXT_LENGTH = 4096

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
EDIT_NOT_FOUND = "Bad Request: message to edit not found"
DELETE_NOT_FOUND = "Bad Request: message to delete not found"
REPLY_NOT_FOUND = "Bad Request: message to be replied not found"
TEXT_EMPTY = "Bad Request: message text is empty"
TEXT_TOO_LONG = "Bad Request: message is too long"
CANT_PARSE = "Bad Request: can't parse entities: "
WEBHOOK_ACTIVE = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
TERMINATED_BY_WEBHOOK = "Conflict: terminated by setWebhook request"
TERMINATED_BY_POLL = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)

_DEFAULT_DESCRIPTIONS = {
    400: "Bad Request: injected failure",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    409: TERMINATED_BY_POLL,
    500: "Internal Server Error",
    502: "Bad Gateway",
}

# Parameters that are strings in the Bot API: never JSON-decoded, even if they look like
# numbers or JSON ("text": "42" must stay a string).
_STRING_PARAMS = frozenset(
    {
        "text",
        "caption",
        "parse_mode",
        "url",
        "secret_token",
        "ip_address",
        "callback_query_id",
        "inline_message_id",
        "inline_query_id",
        "data",
        "file_id",
        "language_code",
        "query",
        "emoji",
        "title",
        "description",
        "name",
        "short_name",
        "custom_emoji_id",
        "business_connection_id",
        "message_effect_id",
        "action",
        "question",
        "explanation",
        "payload",
        "currency",
        "provider_token",
        "start_parameter",
        "address",
        "first_name",
        "last_name",
        "phone_number",
        "vcard",
        "game_short_name",
        "sticker",
        "photo",
        "document",
        "audio",
        "voice",
        "video",
        "animation",
        "video_note",
        "thumbnail",
        "certificate",
    }
)
# Parameters that are integers in the Bot API (PTB sends "123" inside forms).
_INT_PARAMS = frozenset(
    {
        "chat_id",
        "from_chat_id",
        "message_id",
        "message_thread_id",
        "direct_messages_topic_id",
        "reply_to_message_id",
        "offset",
        "limit",
        "draft_id",
        "user_id",
        "max_connections",
        "cache_time",
    }
)
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_DEFAULT_SKIPPED_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
_CHAT_ACTIONS = frozenset(
    {
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "upload_document",
        "choose_sticker",
        "find_location",
        "record_video_note",
        "upload_video_note",
    }
)
_SENDING_PREFIXES = ("send", "edit", "delete", "copy", "forward", "answer", "setMessageReaction")
_NOT_SENDING = frozenset({"deleteWebhook", "deleteMyCommands"})


class _Stored(Enum):
    """Sentinel: use the secret token stored by setWebhook."""

    SECRET = 0


STORED_SECRET = _Stored.SECRET


class ApiError(Exception):
    """An error answer of the Bot API; raise it from handlers registered with ``on``."""

    def __init__(
        self, status: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters


class EntityParseError(ValueError):
    """Markup that Telegram would refuse with "can't parse entities"."""


@dataclass
class Call:
    """One request to the Bot API. ``status`` is None while the call is in flight."""

    method: str
    params: dict[str, Any]
    time: float
    http_method: str = "POST"
    status: int | None = None
    description: str | None = None
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class SentMessage:
    """A message the bot sent, with its edits."""

    chat_id: int
    message_id: int
    text: str
    """The text as the bot last sent it (markup included)."""
    parse_mode: str | None
    plain: str
    """The text as the user sees it (markup parsed away)."""
    entities: list[dict[str, Any]]
    reply_markup: dict[str, Any] | None
    message_thread_id: int | None
    message: dict[str, Any]
    """The Message object last returned for it."""
    history: list[str] = field(default_factory=list)
    """Every version of ``text``, oldest first."""
    sent_at: float = 0.0
    edited_at: float | None = None
    deleted: bool = False


@dataclass
class Draft:
    """One sendMessageDraft call that succeeded."""

    chat_id: int
    draft_id: int
    text: str
    plain: str
    message_thread_id: int | None
    time: float


#: :meth:`FakeTelegram.fail` statuses that are not HTTP answers
DISCONNECT = -1
TIMEOUT = -2


@dataclass
class Fault:
    """An injected error, see :meth:`FakeTelegram.fail`: an HTTP status, or
    :data:`DISCONNECT` or :data:`TIMEOUT`."""

    method: str
    status: int
    description: str
    times: int | None
    parameters: dict[str, Any] | None = None
    when: Callable[[dict[str, Any]], bool] | None = None
    hits: int = 0
    #: for TIMEOUT: seconds the answer is held back
    delay: float = 0.0

    def matches(self, method: str, params: dict[str, Any]) -> bool:
        if self.method != "*" and self.method.lower() != method.lower():
            return False
        return self.when is None or bool(self.when(params))


@dataclass
class Webhook:
    url: str
    secret_token: str | None = None
    allowed_updates: list[str] | None = None
    max_connections: int = 40
    ip_address: str | None = None


@dataclass
class Delivery:
    """One update POSTed to the webhook by :meth:`FakeTelegram.deliver`."""

    update: dict[str, Any]
    url: str
    status: int


@dataclass
class FakeFile:
    file_id: str
    file_unique_id: str
    file_path: str
    content: bytes


@dataclass
class UploadedFile:
    """A file part of a multipart request."""

    filename: str | None
    content_type: str
    content: bytes


Handler = Callable[[dict[str, Any]], Any]


class FakeTelegram:
    """A fake Bot API server. See the module docstring."""

    def __init__(
        self,
        token: str = DEFAULT_TOKEN,
        username: str = "turbo_test_bot",
        bot_id: int | None = None,
        *,
        first_name: str = "Turbo Test Bot",
        latency: float = 0.0,
    ) -> None:
        self.token = token
        self.username = username
        prefix = token.split(":", 1)[0]
        self.bot_id = bot_id if bot_id is not None else int(prefix) if prefix.isdigit() else 1
        self.first_name = first_name
        self.latency = latency
        """Seconds added to every sending method (send*, edit*, delete*, answer*...)."""

        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []
        """Every update pushed, in order."""
        self.pending: list[dict[str, Any]] = []
        """Updates not yet confirmed by a getUpdates offset."""
        self.messages: dict[int, dict[int, SentMessage]] = {}
        self.inbox: dict[int, dict[int, dict[str, Any]]] = {}
        """Messages built by :meth:`message` per chat, by message_id."""
        self.drafts: list[Draft] = []
        self.chats: dict[int, dict[str, Any]] = {}
        self.admins: dict[int, dict[int, str]] = {}
        """Per chat, its owner ("creator") and "administrator"s; getChatMember says "member"
        for everyone else (the user in a private chat is its owner)."""
        self.files: dict[str, FakeFile] = {}
        self.commands: list[dict[str, Any]] = []
        self.webhook: Webhook | None = None
        self.deliveries: list[Delivery] = []
        self.faults: list[Fault] = []
        self.port = 0

        self._handlers: dict[str, Handler] = {
            "getMe": self._get_me,
            "logOut": _true,
            "close": _true,
            "getUpdates": self._get_updates,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "deleteMessages": self._delete_messages,
            "sendMessageDraft": self._send_message_draft,
            "sendChatAction": self._send_chat_action,
            "answerCallbackQuery": _true,
            "setMessageReaction": _true,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": lambda params: self.commands,
            "deleteMyCommands": self._delete_my_commands,
            "getFile": self._get_file,
            "getChatMember": self._get_chat_member,
        }
        self._next_update_id = 1
        self._next_message_id: dict[int, int] = {}
        self._file_ids = itertools.count(1)
        self._callback_ids = itertools.count(1)
        self._allowed_updates: list[str] | None = None
        self._poll_generation = 0
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._closing = False
        self._pace: tuple[float, int, frozenset[str]] | None = None
        self._paced_at: dict[int | str, float] = {}
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """For ``ApplicationBuilder().base_url``: PTB appends the token."""
        return f"{self.url}/bot"

    @property
    def base_file_url(self) -> str:
        return f"{self.url}/file/bot"

    async def start(self) -> FakeTelegram:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        # handler_cancellation: a long poll whose client went away is cancelled at once.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self._closing = True
        self._wake_pollers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- inspection --------------------------------------------------------------------

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def sent(self, chat_id: int) -> list[SentMessage]:
        """The bot's messages in a chat that are not deleted, by message_id."""
        chat = self.messages.get(chat_id, {})
        return [chat[mid] for mid in sorted(chat) if not chat[mid].deleted]

    def texts(self, chat_id: int, *, plain: bool = False) -> list[str]:
        """Final texts of the bot's messages in a chat, by message_id.

        With ``plain`` the parsed text (as the user sees it), else the text as sent.
        """
        return [m.plain if plain else m.text for m in self.sent(chat_id)]

    def last_text(self, chat_id: int, *, plain: bool = False) -> str | None:
        texts = self.texts(chat_id, plain=plain)
        return texts[-1] if texts else None

    def draft_texts(self, chat_id: int, draft_id: int | None = None) -> list[str]:
        return [
            d.text
            for d in self.drafts
            if d.chat_id == chat_id and (draft_id is None or d.draft_id == draft_id)
        ]

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Waits until ``predicate()`` holds; it is rechecked after every call and push."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def wait_for_call(
        self,
        method: str,
        *,
        count: int = 1,
        when: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> Call:
        """Waits until ``count`` calls of ``method`` (matching ``when``) have been answered;
        returns the ``count``-th."""

        def matching() -> list[Call]:
            return [
                c
                for c in self.calls_of(method)
                if c.status is not None and (when is None or when(c.params))
            ]

        await self.wait_until(lambda: len(matching()) >= count, timeout)
        return matching()[count - 1]

    # -- scripting ---------------------------------------------------------------------

    def on(self, method: str, handler: Handler) -> None:
        """Answers ``method`` with ``handler(params)`` (sync or async); raise ApiError to
        answer an error. Replaces a built-in method or adds one."""
        for name in [n for n in self._handlers if n.lower() == method.lower()]:
            del self._handlers[name]
        self._handlers[method] = handler

    def fail(
        self,
        method: str,
        *,
        status: int = 400,
        delay: float = 0.0,
        description: str | None = None,
        times: int | None = 1,
        retry_after: int | None = None,
        when: Callable[[dict[str, Any]], bool] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Fault:
        """The next ``times`` calls of ``method`` ("*" for any; ``times=None`` for ever)
        for which ``when(params)`` holds answer ``status``. A 429 carries
        ``parameters.retry_after`` (default 1 s).

        ``status=DISCONNECT``: the connection is closed before anything is done (the
        client sees a reset). ``status=TIMEOUT``: the call is carried out, then its
        answer waits ``delay`` seconds, longer than the client waits: the client cannot
        tell whether it went through (a message it sends again is shown twice)."""
        if status in (DISCONNECT, TIMEOUT):
            fault = Fault(method, status, "", times, None, when, delay=delay)
            self.faults.append(fault)
            return fault
        params = dict(parameters or {})
        if status == 429:
            retry_after = 1 if retry_after is None else retry_after
        if retry_after is not None:
            params["retry_after"] = retry_after
        if description is None:
            if status == 429:
                description = f"Too Many Requests: retry after {retry_after}"
            else:
                description = _DEFAULT_DESCRIPTIONS.get(status, f"Error {status}")
        fault = Fault(method, status, description, times, params or None, when)
        self.faults.append(fault)
        return fault

    def limit_edits(
        self,
        per_seconds: float | None = 1.0,
        *,
        retry_after: int = 1,
        methods: Iterable[str] = ("editMessageText", "sendMessage"),
    ) -> None:
        """Answers 429 to ``methods`` in a chat called sooner than ``per_seconds`` after the
        last successful one of them in that chat. ``per_seconds=None`` turns it off."""
        if per_seconds is None:
            self._pace = None
        else:
            self._pace = (per_seconds, retry_after, frozenset(m.lower() for m in methods))
        self._paced_at.clear()

    # -- updates -----------------------------------------------------------------------

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queues an update for getUpdates (assigning ``update_id`` if missing)."""
        self._assign_update_id(update)
        self.updates.append(update)
        self.pending.append(update)
        self._wake_pollers()
        self._notify()
        return update

    def bot_user(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.first_name,
            "username": self.username,
        }

    def user(
        self,
        user_id: int,
        *,
        first_name: str = "Alice",
        username: str | None = "alice",
        last_name: str | None = None,
        is_bot: bool = False,
        language_code: str | None = "en",
    ) -> dict[str, Any]:
        user: dict[str, Any] = {"id": user_id, "is_bot": is_bot, "first_name": first_name}
        if last_name is not None:
            user["last_name"] = last_name
        if username is not None:
            user["username"] = username
        if language_code is not None and not is_bot:
            user["language_code"] = language_code
        return user

    def chat(
        self,
        chat_id: int,
        chat_type: str | None = None,
        *,
        title: str | None = None,
        is_forum: bool | None = None,
        first_name: str = "Alice",
        username: str | None = "alice",
    ) -> dict[str, Any]:
        """The Chat object of ``chat_id`` (registered for later messages and replies).

        The type defaults to the known one, else "private" for positive ids and
        "supergroup" for negative ones.
        """
        known = self.chats.get(chat_id, {})
        chat_type = chat_type or known.get("type") or ("private" if chat_id > 0 else "supergroup")
        chat: dict[str, Any] = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
            if username is not None:
                chat["username"] = username
        else:
            chat["title"] = title or known.get("title") or f"Test {chat_type} {chat_id}"
            forum = known.get("is_forum", False) if is_forum is None else is_forum
            if chat_type == "supergroup" and forum:
                chat["is_forum"] = True
        self.chats[chat_id] = chat
        return chat

    def message(
        self, chat_id: int, text: str | None = None, *, push: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """A ``message`` update from a user, with an ``update_id``; pushed unless ``push=False``.

        ``fields`` are the keywords of :meth:`_build_message` (an unknown one raises).

        ``user_id`` defaults to ``chat_id`` in private chats and 1001 elsewhere; the chat
        type to "private" for positive ids and "supergroup" for negative ones. Commands
        ("/start") and "@name" mentions get entities unless ``entities`` is given.
        ``media`` is "photo", "sticker", "voice", "audio", "document", "video",
        "animation" or "video_note" (a minimal valid object, its file served by getFile),
        or a dict merged into the message.
        """
        msg = self._build_message(chat_id, text, **fields)
        update = {"message": msg}
        self._assign_update_id(update)
        return self.push(update) if push else update

    def edited_message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        message_id: int | None = None,
        edit_date: int | None = None,
        push: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """An ``edited_message`` update; ``message_id`` defaults to the last message built
        in the chat. Other keywords as for :meth:`message`."""
        if message_id is None:
            known = self.inbox.get(chat_id)
            if not known:
                raise ValueError(f"no message in chat {chat_id} to edit; pass message_id")
            message_id = max(known)
        previous = self.inbox.get(chat_id, {}).get(message_id)
        if previous is not None and "date" not in kwargs:
            kwargs["date"] = previous["date"]
        msg = self._build_message(chat_id, text, message_id=message_id, **kwargs)
        msg["edit_date"] = edit_date if edit_date is not None else int(time.time())
        update = {"edited_message": msg}
        self._assign_update_id(update)
        return self.push(update) if push else update

    def callback_query(
        self,
        chat_id: int,
        data: str,
        *,
        message: dict[str, Any] | SentMessage | None = None,
        user_id: int | None = None,
        first_name: str = "Alice",
        username: str | None = "alice",
        push: bool = True,
    ) -> dict[str, Any]:
        """A ``callback_query`` update (an inline button press) on ``message``, by default
        the bot's last message in the chat."""
        if message is None:
            sent = self.sent(chat_id)
            if not sent:
                raise ValueError(f"the bot sent no message in chat {chat_id}")
            message = sent[-1]
        msg = message.message if isinstance(message, SentMessage) else message
        if user_id is None:
            user_id = chat_id if chat_id > 0 else 1001
        query = {
            "id": str(next(self._callback_ids)),
            "from": self.user(user_id, first_name=first_name, username=username),
            "chat_instance": f"ci{chat_id}",
            "message": msg,
            "data": data,
        }
        update = {"callback_query": query}
        self._assign_update_id(update)
        return self.push(update) if push else update

    def add_file(self, content: bytes, *, file_path: str | None = None) -> FakeFile:
        """Registers a file for getFile and the file download URL."""
        n = next(self._file_ids)
        fake = FakeFile(f"FILE{n}", f"U{n}", file_path or f"files/file_{n}", content)
        self.files[fake.file_id] = fake
        return fake

    async def deliver(
        self,
        update: dict[str, Any],
        *,
        secret: str | Literal[_Stored.SECRET] | None = STORED_SECRET,
        path: str | None = None,
    ) -> int:
        """POSTs ``update`` to the webhook as Telegram would; returns the HTTP status.

        ``secret`` defaults to the ``secret_token`` given to setWebhook; ``None`` sends no
        header. ``path`` replaces the path of the webhook URL.
        """
        if self.webhook is None:
            raise RuntimeError("no webhook is set")
        self._assign_update_id(update)
        url = self.webhook.url
        if path is not None:
            parts = urlsplit(url)
            url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        token = self.webhook.secret_token if secret is STORED_SECRET else secret
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = token
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=json.dumps(update), headers=headers) as response,
        ):
            await response.read()
            status = response.status
        self.deliveries.append(Delivery(update, url, status))
        self._notify()
        return status

    # -- HTTP --------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        params = await _read_params(request)
        handler_name = next((n for n in self._handlers if n.lower() == name.lower()), None)
        call = Call(handler_name or name, params, time.monotonic(), request.method)
        self.calls.append(call)
        self._notify()
        try:
            if request.match_info["token"] != self.token:
                raise ApiError(401, "Unauthorized")
            if handler_name is None:
                raise ApiError(404, "Not Found")
            if self.latency and _is_sending(handler_name):
                await asyncio.sleep(self.latency)
            held = self._inject_fault(handler_name, params)
            if held is not None and held.status == DISCONNECT:
                call.status = DISCONNECT
                if request.transport is not None:
                    request.transport.abort()  # a reset: no answer at all
                return web.Response(status=204)
            self._check_pace(handler_name, params, call.time)
            result = self._handlers[handler_name](params)
            if inspect.isawaitable(result):
                result = await result
            if held is not None:  # TIMEOUT: done, but the answer comes too late
                call.status, call.result = TIMEOUT, result
                self._notify()
                await asyncio.sleep(held.delay)
        except ApiError as exc:
            call.status, call.description = exc.status, exc.description
            self._notify()
            body: dict[str, Any] = {
                "ok": False,
                "error_code": exc.status,
                "description": exc.description,
            }
            if exc.parameters:
                body["parameters"] = exc.parameters
            return web.json_response(body, status=exc.status)
        call.status, call.result = 200, result
        self._mark_paced(handler_name, params, call.time)
        self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        path = request.match_info["path"]
        for fake in self.files.values():
            if fake.file_path == path:
                return web.Response(body=fake.content, content_type="application/octet-stream")
        return web.json_response(
            {"ok": False, "error_code": 404, "description": "Not Found"}, status=404
        )

    def _inject_fault(self, method: str, params: dict[str, Any]) -> Fault | None:
        """Raises the injected error for this call; returns a DISCONNECT or TIMEOUT fault."""
        for fault in self.faults:
            if fault.matches(method, params):
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                if fault.status in (DISCONNECT, TIMEOUT):
                    return fault
                raise ApiError(fault.status, fault.description, fault.parameters)
        return None

    def _check_pace(self, method: str, params: dict[str, Any], now: float) -> None:
        if self._pace is None:
            return
        per_seconds, retry_after, methods = self._pace
        chat = params.get("chat_id")
        if method.lower() not in methods or not isinstance(chat, int | str):
            return
        last = self._paced_at.get(chat)
        if last is not None and now - last < per_seconds:
            raise ApiError(
                429,
                f"Too Many Requests: retry after {retry_after}",
                {"retry_after": retry_after},
            )

    def _mark_paced(self, method: str, params: dict[str, Any], now: float) -> None:
        chat = params.get("chat_id")
        paced = self._pace is not None and method.lower() in self._pace[2]
        if paced and isinstance(chat, int | str):
            self._paced_at[chat] = now

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _wake_pollers(self) -> None:
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    def _assign_update_id(self, update: dict[str, Any]) -> None:
        if "update_id" not in update:
            update["update_id"] = self._next_update_id
        self._next_update_id = max(self._next_update_id, int(update["update_id"]) + 1)

    # -- methods: updates and webhook --------------------------------------------------

    def _get_me(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    def _allowed(self, update: dict[str, Any]) -> bool:
        kind = next((k for k in update if k != "update_id"), "")
        if self._allowed_updates:
            return kind in self._allowed_updates
        return kind not in _DEFAULT_SKIPPED_UPDATES

    async def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise ApiError(409, WEBHOOK_ACTIVE)
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake_pollers()  # an older long poll is terminated by this one

        offset = _int(params.get("offset"))
        if offset is not None and offset > 0:
            self.pending = [u for u in self.pending if u["update_id"] >= offset]
        elif offset is not None and offset < 0:
            self.pending = self.pending[offset:]
        limit = min(max(_int(params.get("limit")) or 100, 1), 100)
        timeout = max(float(params.get("timeout") or 0), 0.0)
        allowed = params.get("allowed_updates")
        if isinstance(allowed, list):
            self._allowed_updates = [str(a) for a in allowed]

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._closing:
            if self.webhook is not None:
                raise ApiError(409, TERMINATED_BY_WEBHOOK)
            if generation != self._poll_generation:
                raise ApiError(409, TERMINATED_BY_POLL)
            ready = [u for u in self.pending if self._allowed(u)]
            if ready:
                return ready[:limit]
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            wake = self._wake
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), remaining)
        return []

    def _set_webhook(self, params: dict[str, Any]) -> bool:
        url = params.get("url") or ""
        if not url:
            return self._delete_webhook(params)
        allowed = params.get("allowed_updates")
        self.webhook = Webhook(
            url=str(url),
            secret_token=params.get("secret_token"),
            allowed_updates=list(allowed) if isinstance(allowed, list) else None,
            max_connections=_int(params.get("max_connections")) or 40,
            ip_address=params.get("ip_address"),
        )
        if isinstance(allowed, list):
            self._allowed_updates = [str(a) for a in allowed]
        if params.get("drop_pending_updates"):
            self.pending.clear()
        self._wake_pollers()
        return True

    def _delete_webhook(self, params: dict[str, Any]) -> bool:
        self.webhook = None
        if params.get("drop_pending_updates"):
            self.pending.clear()
        return True

    def _get_webhook_info(self, params: dict[str, Any]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "url": self.webhook.url if self.webhook else "",
            "has_custom_certificate": False,
            "pending_update_count": len(self.pending),
        }
        if self.webhook is not None:
            info["max_connections"] = self.webhook.max_connections
            if self.webhook.allowed_updates is not None:
                info["allowed_updates"] = self.webhook.allowed_updates
            if self.webhook.ip_address:
                info["ip_address"] = self.webhook.ip_address
        return info

    # -- methods: messages -------------------------------------------------------------

    def _send_message(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        text = params.get("text")
        if not isinstance(text, str):
            raise ApiError(400, TEXT_EMPTY)
        plain, entities = _render(text, params.get("parse_mode"), params.get("entities"))
        _check_text(plain)
        reply = self._reply_to(chat_id, params)
        message_id = self._new_message_id(chat_id)
        thread = _int(params.get("message_thread_id"))
        chat = self.chats.get(chat_id) or self.chat(chat_id)
        msg: dict[str, Any] = {
            "message_id": message_id,
            "from": self.bot_user(),
            "date": int(time.time()),
            "chat": chat,
        }
        if thread is not None:
            msg["message_thread_id"] = thread
            if chat.get("is_forum") or chat["type"] == "private":
                msg["is_topic_message"] = True
        if reply is not None:
            msg["reply_to_message"] = reply
        msg["text"] = plain
        if entities:
            msg["entities"] = entities
        markup = _inline_markup(params.get("reply_markup"))
        if markup is not None:
            msg["reply_markup"] = markup
        self.messages.setdefault(chat_id, {})[message_id] = SentMessage(
            chat_id=chat_id,
            message_id=message_id,
            text=text,
            parse_mode=params.get("parse_mode"),
            plain=plain,
            entities=entities,
            reply_markup=markup,
            message_thread_id=thread,
            message=msg,
            history=[text],
            sent_at=time.monotonic(),
        )
        return msg

    def _edit_message_text(self, params: dict[str, Any]) -> dict[str, Any] | bool:
        if params.get("inline_message_id"):
            return True
        sent = self._message_to_edit(params)
        text = params.get("text")
        if not isinstance(text, str):
            raise ApiError(400, TEXT_EMPTY)
        plain, entities = _render(text, params.get("parse_mode"), params.get("entities"))
        _check_text(plain)
        markup = _inline_markup(params.get("reply_markup"))
        if (plain, entities, markup) == (sent.plain, sent.entities, sent.reply_markup):
            raise ApiError(400, NOT_MODIFIED)
        sent.text, sent.plain, sent.entities = text, plain, entities
        sent.parse_mode = params.get("parse_mode")
        sent.history.append(text)
        return self._edited(sent, markup)

    def _edit_message_reply_markup(self, params: dict[str, Any]) -> dict[str, Any] | bool:
        if params.get("inline_message_id"):
            return True
        sent = self._message_to_edit(params)
        markup = _inline_markup(params.get("reply_markup"))
        if markup == sent.reply_markup:
            raise ApiError(400, NOT_MODIFIED)
        return self._edited(sent, markup)

    def _edited(self, sent: SentMessage, markup: dict[str, Any] | None) -> dict[str, Any]:
        sent.reply_markup = markup
        sent.edited_at = time.monotonic()
        msg = {k: v for k, v in sent.message.items() if k not in ("entities", "reply_markup")}
        msg["text"] = sent.plain
        msg["edit_date"] = int(time.time())
        if sent.entities:
            msg["entities"] = sent.entities
        if markup is not None:
            msg["reply_markup"] = markup
        sent.message = msg
        return msg

    def _message_to_edit(self, params: dict[str, Any]) -> SentMessage:
        chat_id = self._chat_id(params)
        message_id = _int(params.get("message_id"))
        if message_id is None:
            raise ApiError(400, "Bad Request: message identifier is not specified")
        sent = self.messages.get(chat_id, {}).get(message_id)
        if sent is None or sent.deleted:
            if message_id in self.inbox.get(chat_id, {}):
                raise ApiError(400, "Bad Request: message can't be edited")
            raise ApiError(400, EDIT_NOT_FOUND)
        return sent

    def _delete_message(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat_id(params)
        message_id = _int(params.get("message_id"))
        sent = self.messages.get(chat_id, {}).get(message_id or 0)
        if sent is not None and not sent.deleted:
            sent.deleted = True
            return True
        if self.inbox.get(chat_id, {}).pop(message_id or 0, None) is not None:
            return True
        raise ApiError(400, DELETE_NOT_FOUND)

    def _delete_messages(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat_id(params)
        ids = params.get("message_ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError(400, "Bad Request: message identifiers are not specified")
        for message_id in ids:
            sent = self.messages.get(chat_id, {}).get(int(message_id))
            if sent is not None:
                sent.deleted = True
            self.inbox.get(chat_id, {}).pop(int(message_id), None)
        return True

    def _send_message_draft(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat_id(params)
        draft_id = _int(params.get("draft_id"))
        if not draft_id:
            raise ApiError(400, "Bad Request: draft_id must be non-zero")
        chat = self.chats.get(chat_id)
        if (chat["type"] if chat else "private" if chat_id > 0 else "group") != "private":
            # Approximation: the Bot API documents drafts for private chats only.
            raise ApiError(400, "Bad Request: message drafts can be sent to private chats only")
        text = params.get("text") or ""
        plain, _ = _render(str(text), params.get("parse_mode"), params.get("entities"))
        if len(plain) > MAX_TEXT_LENGTH:
            raise ApiError(400, TEXT_TOO_LONG)
        self.drafts.append(
            Draft(
                chat_id=chat_id,
                draft_id=draft_id,
                text=str(text),
                plain=plain,
                message_thread_id=_int(params.get("message_thread_id")),
                time=time.monotonic(),
            )
        )
        return True

    def _send_chat_action(self, params: dict[str, Any]) -> bool:
        self._chat_id(params)
        if params.get("action") not in _CHAT_ACTIONS:
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    def _set_my_commands(self, params: dict[str, Any]) -> bool:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise ApiError(400, 'Bad Request: parameter "commands" can\'t be parsed')
        self.commands = commands
        return True

    def _delete_my_commands(self, params: dict[str, Any]) -> bool:
        self.commands = []
        return True

    def _get_chat_member(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        try:
            user_id = int(params.get("user_id", ""))
        except ValueError:
            raise ApiError(400, "Bad Request: invalid user_id specified") from None
        status = self.admins.get(chat_id, {}).get(user_id)
        if status is None:
            status = "creator" if chat_id == user_id else "member"
        member: dict[str, Any] = {"status": status, "user": self.user(user_id)}
        if status == "creator":
            member["is_anonymous"] = False
        elif status == "administrator":
            member["is_anonymous"] = False
            for right in _ADMIN_RIGHTS:
                member[right] = True
        return member

    def _get_file(self, params: dict[str, Any]) -> dict[str, Any]:
        fake = self.files.get(str(params.get("file_id")))
        if fake is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        return {
            "file_id": fake.file_id,
            "file_unique_id": fake.file_unique_id,
            "file_size": len(fake.content),
            "file_path": fake.file_path,
        }

    # -- helpers -----------------------------------------------------------------------

    def _chat_id(self, params: dict[str, Any]) -> int:
        chat_id = params.get("chat_id")
        if chat_id is None or chat_id == "":
            raise ApiError(400, "Bad Request: chat_id is empty")
        if isinstance(chat_id, int):
            return chat_id
        name = str(chat_id).removeprefix("@").lower()
        for chat in self.chats.values():
            if str(chat.get("username", "")).lower() == name:
                return int(chat["id"])
        raise ApiError(400, "Bad Request: chat not found")

    def _new_message_id(self, chat_id: int) -> int:
        message_id = self._next_message_id.get(chat_id, 1)
        self._next_message_id[chat_id] = message_id + 1
        return message_id

    def _find_message(self, chat_id: int, message_id: int) -> dict[str, Any] | None:
        sent = self.messages.get(chat_id, {}).get(message_id)
        if sent is not None and not sent.deleted:
            return sent.message
        return self.inbox.get(chat_id, {}).get(message_id)

    def _reply_to(self, chat_id: int, params: dict[str, Any]) -> dict[str, Any] | None:
        reply = params.get("reply_parameters")
        if not isinstance(reply, dict):
            if params.get("reply_to_message_id") is None:
                return None
            reply = {"message_id": params["reply_to_message_id"]}
        target_chat = _int(reply.get("chat_id")) or chat_id
        message_id = _int(reply.get("message_id"))
        found = self._find_message(target_chat, message_id or 0)
        if found is None:
            if reply.get("allow_sending_without_reply") or params.get(
                "allow_sending_without_reply"
            ):
                return None
            raise ApiError(400, REPLY_NOT_FOUND)
        return {k: v for k, v in found.items() if k != "reply_to_message"}

    def _build_message(
        self,
        chat_id: int,
        text: str | None = None,
        *,
        user_id: int | None = None,
        chat_type: str | None = None,
        username: str | None = "alice",
        first_name: str = "Alice",
        last_name: str | None = None,
        chat_title: str | None = None,
        message_id: int | None = None,
        message_thread_id: int | None = None,
        is_topic_message: bool | None = None,
        is_forum: bool | None = None,
        entities: list[dict[str, Any]] | None = None,
        reply_to_message: dict[str, Any] | SentMessage | None = None,
        caption: str | None = None,
        media: str | dict[str, Any] | None = None,
        from_bot: bool = False,
        date: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        known_type = self.chats.get(chat_id, {}).get("type")
        kind = chat_type or known_type or ("private" if chat_id > 0 else "supergroup")
        if is_forum is None and kind == "supergroup" and message_thread_id is not None:
            is_forum = is_topic_message is not False
        chat = self.chat(
            chat_id,
            kind,
            title=chat_title,
            is_forum=is_forum,
            first_name=first_name,
            username=username,
        )
        if user_id is None:
            user_id = chat_id if kind == "private" else 1001
        if message_id is None:
            message_id = self._new_message_id(chat_id)
        else:
            self._next_message_id[chat_id] = max(
                self._next_message_id.get(chat_id, 1), message_id + 1
            )
        sender = self.user(
            user_id,
            first_name=first_name,
            username=username,
            last_name=last_name,
            is_bot=from_bot,
        )
        msg: dict[str, Any] = {
            "message_id": message_id,
            "from": sender,
            "date": date if date is not None else int(time.time()),
            "chat": chat,
        }
        if message_thread_id is not None:
            msg["message_thread_id"] = message_thread_id
            if is_topic_message is None:
                is_topic_message = bool(chat.get("is_forum")) or kind == "private"
        if is_topic_message:
            msg["is_topic_message"] = True
        if reply_to_message is not None:
            reply = (
                reply_to_message.message
                if isinstance(reply_to_message, SentMessage)
                else reply_to_message
            )
            msg["reply_to_message"] = {k: v for k, v in reply.items() if k != "reply_to_message"}
        if isinstance(media, dict):
            msg.update(media)
        elif media is not None:
            msg.update(self._media(media))
        if text is not None:
            msg["text"] = text
            found = entities if entities is not None else _auto_entities(text)
            if found:
                msg["entities"] = found
        if caption is not None:
            msg["caption"] = caption
            found = _auto_entities(caption)
            if found:
                msg["caption_entities"] = found
        if extra:
            msg.update(extra)
        self.inbox.setdefault(chat_id, {})[message_id] = msg
        return msg

    def _media(self, kind: str) -> dict[str, Any]:
        content = {
            "photo": b"\xff\xd8\xff\xe0fake-jpeg",
            "sticker": b"RIFFfake-webp",
            "voice": b"OggSfake-opus",
            "audio": b"ID3fake-mp3",
            "video": b"\x00\x00\x00\x18ftypmp42fake",
            "animation": b"\x00\x00\x00\x18ftypmp42fake",
            "video_note": b"\x00\x00\x00\x18ftypmp42fake",
            "document": b"%PDF-1.4 fake",
        }
        if kind not in content:
            raise ValueError(f"unknown media kind {kind!r}; use one of {sorted(content)}")
        fake = self.add_file(content[kind], file_path=f"{kind}s/file_{len(self.files) + 1}")
        base = {"file_id": fake.file_id, "file_unique_id": fake.file_unique_id}
        size = {"file_size": len(fake.content)}
        if kind == "photo":
            return {
                "photo": [
                    {**base, "width": 90, "height": 90, **size},
                    {**base, "width": 320, "height": 320, **size},
                ]
            }
        if kind == "sticker":
            return {
                "sticker": {
                    **base,
                    "type": "regular",
                    "width": 512,
                    "height": 512,
                    "is_animated": False,
                    "is_video": False,
                    "emoji": "👍",
                    **size,
                }
            }
        if kind == "voice":
            return {"voice": {**base, "duration": 2, "mime_type": "audio/ogg", **size}}
        if kind == "audio":
            return {"audio": {**base, "duration": 3, "mime_type": "audio/mpeg", **size}}
        if kind == "document":
            return {
                "document": {
                    **base,
                    "file_name": "file.pdf",
                    "mime_type": "application/pdf",
                    **size,
                }
            }
        if kind == "video_note":
            return {"video_note": {**base, "length": 240, "duration": 2, **size}}
        video = {**base, "width": 320, "height": 240, "duration": 2, "mime_type": "video/mp4"}
        return {kind: {**video, **size}}


# -- parameters ------------------------------------------------------------------------


async def _true(params: dict[str, Any]) -> bool:
    return True


def _is_sending(method: str) -> bool:
    return method.startswith(_SENDING_PREFIXES) and method not in _NOT_SENDING


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


async def _read_params(request: web.Request) -> dict[str, Any]:
    """Parameters from the query string and a form, multipart or JSON body."""
    params: dict[str, Any] = dict(request.query)
    if request.method == "POST" and request.body_exists:
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        else:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    params[key] = UploadedFile(
                        value.filename, value.content_type, value.file.read()
                    )
                else:
                    params[key] = value
    return _normalize(params)


def _normalize(params: dict[str, Any]) -> dict[str, Any]:
    """Decodes what PTB JSON-encodes inside forms and makes integer ids integers."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, str) and key not in _STRING_PARAMS:
            value = _decode(value)
        if key in _INT_PARAMS:
            number = _int(value)
            value = number if number is not None else value
        elif key == "message_ids" and isinstance(value, list):
            value = [_int(v) if _int(v) is not None else v for v in value]
        out[key] = value
    return out


def _decode(value: str) -> Any:
    stripped = value.strip()
    if stripped[:1] in ("{", "[") or stripped in ("true", "false", "null"):
        try:
            return json.loads(stripped)
        except ValueError:
            return value
    if _NUMBER_RE.fullmatch(stripped):
        return float(stripped) if "." in stripped else int(stripped)
    return value


def _inline_markup(markup: Any) -> dict[str, Any] | None:
    """Messages carry only inline keyboards as reply_markup."""
    if isinstance(markup, dict) and "inline_keyboard" in markup:
        return markup
    return None


def _check_text(plain: str) -> None:
    if not plain.strip():
        raise ApiError(400, TEXT_EMPTY)
    if len(plain) > MAX_TEXT_LENGTH:
        raise ApiError(400, TEXT_TOO_LONG)


def _render(text: str, parse_mode: Any, entities: Any) -> tuple[str, list[dict[str, Any]]]:
    mode = str(parse_mode or "").lower()
    try:
        if mode == "html":
            return parse_html(text)
        if mode == "markdownv2":
            return parse_markdown_v2(text)
        if mode == "markdown":
            return parse_markdown(text)
    except EntityParseError as exc:
        raise ApiError(400, CANT_PARSE + str(exc)) from None
    if mode:
        raise ApiError(400, f"Bad Request: unsupported parse_mode {parse_mode!r}")
    return text, list(entities) if isinstance(entities, list) else []


_COMMAND_RE = re.compile(r"(?<![\w/@])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION_RE = re.compile(r"(?<![\w@/])@[A-Za-z0-9_]{3,32}")


def _auto_entities(text: str) -> list[dict[str, Any]]:
    """bot_command and mention entities, as Telegram adds them to incoming messages."""
    found: list[dict[str, Any]] = []
    covered: list[tuple[int, int]] = []
    for match in _COMMAND_RE.finditer(text):
        covered.append(match.span())
        found.append(_entity("bot_command", text, match.start(), match.end()))
    for match in _MENTION_RE.finditer(text):
        if not any(a <= match.start() < b for a, b in covered):
            found.append(_entity("mention", text, match.start(), match.end()))
    return sorted(found, key=lambda e: e["offset"])


def _entity(kind: str, text: str, start: int, end: int) -> dict[str, Any]:
    return {"type": kind, "offset": _u16(text[:start]), "length": _u16(text[start:end])}


# -- markup ----------------------------------------------------------------------------


def _u16(text: str) -> int:
    """Length in UTF-16 code units, the unit of entity offsets."""
    return len(text.encode("utf-16-le")) // 2


def _byte(text: str, index: int) -> int:
    return len(text[:index].encode())


class _Out:
    """Rendered text with its running UTF-16 length."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.u16 = 0

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.u16 += _u16(text)

    def value(self) -> str:
        return "".join(self.parts)


def _finish(out: _Out, entities: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    kept = [e for e in entities if e["length"] > 0]
    return out.value(), sorted(kept, key=lambda e: (e["offset"], -e["length"]))


_HTML_TAG_RE = re.compile(
    r"<(/?)([A-Za-z][A-Za-z0-9-]*)"
    r"((?:\s+[A-Za-z_:][A-Za-z0-9_:.-]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'=<>`]+))?)*)"
    r"\s*(/?)>"
)
_HTML_ATTR_RE = re.compile(
    r"([A-Za-z_:][A-Za-z0-9_:.-]*)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'=<>`]+)))?"
)
_HTML_ENTITY_RE = re.compile(r"&(?:#([0-9]{1,7})|#[xX]([0-9A-Fa-f]{1,6})|(lt|gt|amp|quot));")
_HTML_TEXT_RE = re.compile(r"[^<>&]+")
_HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_HTML_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}


@dataclass
class _Open:
    tag: str
    start: int
    entity: dict[str, Any] | None


def parse_html(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's HTML parse mode: returns the plain text and its entities, or raises
    EntityParseError for unsupported or unbalanced tags and bare '<', '>' and '&'."""
    out = _Out()
    entities: list[dict[str, Any]] = []
    stack: list[_Open] = []
    i = 0
    while i < len(text):
        plain = _HTML_TEXT_RE.match(text, i)
        if plain is not None:
            out.add(plain.group())
            i = plain.end()
            continue
        char, offset = text[i], _byte(text, i)
        if char == "&":
            match = _HTML_ENTITY_RE.match(text, i)
            if match is None:
                raise EntityParseError(
                    f'Character "&" at byte offset {offset} is not a part of an HTML entity; '
                    'write it as "&amp;"'
                )
            number, hex_number, named = match.groups()
            if named:
                out.add(_HTML_NAMED[named])
            else:
                code = int(hex_number, 16) if hex_number else int(number)
                if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise EntityParseError(f"Invalid HTML entity at byte offset {offset}")
                out.add(chr(code))
            i = match.end()
            continue
        if char == ">":
            raise EntityParseError(
                f'Character ">" at byte offset {offset} is not a part of a tag; write it as "&gt;"'
            )
        match = _HTML_TAG_RE.match(text, i)
        if match is None:
            raise EntityParseError(
                f'Character "<" at byte offset {offset} does not start a tag; write it as "&lt;"'
            )
        closing, name, attr_text, self_closing = match.groups()
        name = name.lower()
        if closing:
            if not stack:
                raise EntityParseError(f'Unexpected end tag "{name}" at byte offset {offset}')
            top = stack.pop()
            if top.tag != name:
                raise EntityParseError(
                    f'Unmatched end tag at byte offset {offset}, expected "</{top.tag}>", '
                    f'found "</{name}>"'
                )
            if top.entity is not None:
                top.entity.update(offset=top.start, length=out.u16 - top.start)
                entities.append(top.entity)
        else:
            if name not in _HTML_TAGS or self_closing:
                raise EntityParseError(f'Unsupported start tag "{name}" at byte offset {offset}')
            attrs = {
                m.group(1).lower(): html.unescape(m.group(2) or m.group(3) or m.group(4) or "")
                for m in _HTML_ATTR_RE.finditer(attr_text)
            }
            stack.append(_Open(name, out.u16, _html_entity(name, attrs, stack, offset)))
        i = match.end()
    if stack:
        raise EntityParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1].tag}"')
    return _finish(out, entities)


def _html_entity(
    name: str, attrs: dict[str, str], stack: list[_Open], offset: int
) -> dict[str, Any] | None:
    kind = _HTML_TAGS[name]
    if stack and stack[-1].tag == "pre" and name == "code":
        language = attrs.get("class", "")
        pre = stack[-1].entity
        if pre is not None and language.startswith("language-"):
            pre["language"] = language.removeprefix("language-")
        return None
    if any(o.tag in ("code", "pre") for o in stack):
        return None  # code and pre hold no other entities
    if name == "span" and attrs.get("class") != "tg-spoiler":
        raise EntityParseError(f'Tag "span" must have class "tg-spoiler" at byte offset {offset}')
    if name == "a":
        href = attrs.get("href", "")
        if not href:
            return None
        user = re.fullmatch(r"tg://user\?id=(\d+)", href)
        if user is not None:
            user_dict = {"id": int(user.group(1)), "is_bot": False, "first_name": ""}
            return {"type": "text_mention", "user": user_dict}
        return {"type": "text_link", "url": href}
    if name == "tg-emoji":
        emoji_id = attrs.get("emoji-id")
        if not emoji_id:
            raise EntityParseError(f'Tag "tg-emoji" must have "emoji-id" at byte offset {offset}')
        return {"type": "custom_emoji", "custom_emoji_id": emoji_id}
    if name == "blockquote" and "expandable" in attrs:
        return {"type": "expandable_blockquote"}
    return {"type": kind}


_MDV2_TEXT_RE = re.compile(r"[^_*\[\]()~`>#+\-=|{}.!\\\n]+")
_MDV2_NAMES = {
    "*": "Bold",
    "_": "Italic",
    "__": "Underline",
    "~": "Strikethrough",
    "||": "Spoiler",
    "[": "TextUrl",
    "![": "CustomEmoji",
}
_MDV2_TYPES = {
    "*": "bold",
    "_": "italic",
    "__": "underline",
    "~": "strikethrough",
    "||": "spoiler",
}


def _reserved(char: str) -> EntityParseError:
    return EntityParseError(
        f"Character '{char}' is reserved and must be escaped with the preceding '\\'"
    )


def _scan_until(text: str, i: int, end: str, what: str, offset: int) -> tuple[str, int]:
    """Text from ``i`` to the next unescaped ``end``; '\\' escapes any ASCII character."""
    buf: list[str] = []
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and ord(text[i + 1]) < 127:
            buf.append(text[i + 1])
            i += 2
        elif text.startswith(end, i):
            return "".join(buf), i + len(end)
        else:
            buf.append(text[i])
            i += 1
    raise EntityParseError(f"Can't find end of {what} entity at byte offset {offset}")


def parse_markdown_v2(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's MarkdownV2 parse mode, approximately: returns the plain text and its
    entities, or raises EntityParseError for an unescaped reserved character
    ``_*[]()~`>#+-=|{}.!`` outside entity syntax or an unclosed entity."""
    out = _Out()
    entities: list[dict[str, Any]] = []
    stack: list[tuple[str, int, int]] = []  # marker, start (UTF-16), byte offset
    quote: dict[str, Any] | None = None
    quote_end = 0
    line_start = True
    i = 0
    while i < len(text):
        if line_start:
            line_start = False
            if quote is None and text.startswith("**>", i):
                quote = {"type": "expandable_blockquote", "offset": out.u16}
                i += 3
                continue
            if text[i] == ">":
                if quote is None:
                    quote = {"type": "blockquote", "offset": out.u16}
                i += 1
                continue
            if quote is not None:
                entities.append({**quote, "length": quote_end - quote["offset"]})
                quote = None
        plain = _MDV2_TEXT_RE.match(text, i)
        if plain is not None:
            out.add(plain.group())
            i = plain.end()
            continue
        char, offset = text[i], _byte(text, i)
        if char == "\n":
            quote_end = out.u16
            out.add("\n")
            line_start = True
            i += 1
        elif char == "\\":
            if i + 1 < len(text) and 0 < ord(text[i + 1]) < 127:
                out.add(text[i + 1])
                i += 2
            else:
                raise _reserved("\\")
        elif char == "`":
            if text.startswith("```", i):
                body, i = _scan_until(text, i + 3, "```", "Pre", offset)
                entity: dict[str, Any] = {"type": "pre", "offset": out.u16}
                first, newline, rest = body.partition("\n")
                if newline and re.fullmatch(r"[\w#+.-]+", first):
                    entity["language"] = first
                    body = rest
                elif newline and not first:
                    body = rest
            else:
                body, i = _scan_until(text, i + 1, "`", "Code", offset)
                entity = {"type": "code", "offset": out.u16}
            out.add(body)
            entities.append({**entity, "length": out.u16 - entity["offset"]})
        elif (
            quote is not None
            and quote["type"] == "expandable_blockquote"
            and text.startswith("||", i)
            and text[i + 2 : i + 3] in ("", "\n")
            and all(marker != "||" for marker, _, _ in stack)
        ):
            entities.append({**quote, "length": out.u16 - quote["offset"]})
            quote = None
            i += 2
        elif char in "*_~" or text.startswith("||", i):
            marker = "__" if text.startswith("__", i) else "||" if char == "|" else char
            open_markers = [m for m, _, _ in stack]
            if marker in open_markers:
                top, start, top_offset = stack[-1]
                if top != marker:
                    name = _MDV2_NAMES[top]
                    raise EntityParseError(
                        f"Can't find end of {name} entity at byte offset {top_offset}"
                    )
                stack.pop()
                length = out.u16 - start
                entities.append({"type": _MDV2_TYPES[marker], "offset": start, "length": length})
            else:
                stack.append((marker, out.u16, offset))
            i += len(marker)
        elif char == "[" or text.startswith("![", i):
            marker = "![" if char == "!" else "["
            stack.append((marker, out.u16, offset))
            i += len(marker)
        elif char == "]" and stack and stack[-1][0] in ("[", "!["):
            marker, start, _ = stack.pop()
            if not text.startswith("(", i + 1):
                raise EntityParseError(f"Can't find end of a URL at byte offset {offset}")
            url, i = _scan_until(text, i + 2, ")", "TextUrl", offset)
            length = out.u16 - start
            user = re.fullmatch(r"tg://user\?id=(\d+)", url)
            emoji = re.fullmatch(r"tg://emoji\?id=(\d+)", url)
            if marker == "![":
                if emoji is None:
                    raise EntityParseError(f"Custom emoji URL expected at byte offset {offset}")
                entities.append(
                    {
                        "type": "custom_emoji",
                        "offset": start,
                        "length": length,
                        "custom_emoji_id": emoji.group(1),
                    }
                )
            elif user is not None:
                user_dict = {"id": int(user.group(1)), "is_bot": False, "first_name": ""}
                entities.append(
                    {"type": "text_mention", "offset": start, "length": length, "user": user_dict}
                )
            else:
                entities.append(
                    {"type": "text_link", "offset": start, "length": length, "url": url}
                )
        else:
            raise _reserved(char)
    if quote is not None:
        entities.append({**quote, "length": out.u16 - quote["offset"]})
    if stack:
        marker, _, offset = stack[-1]
        raise EntityParseError(
            f"Can't find end of {_MDV2_NAMES[marker]} entity at byte offset {offset}"
        )
    return _finish(out, entities)


_MD_LINK_RE = re.compile(r"\[([^\]]*)\]\(([^)]*)\)")


def parse_markdown(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's legacy Markdown parse mode: *bold*, _italic_, `code`, ```pre```,
    [text](url); '\\' escapes '_', '*', '`' and '['. Entities do not nest."""
    out = _Out()
    entities: list[dict[str, Any]] = []
    i = 0
    while i < len(text):
        char, offset = text[i], _byte(text, i)
        unclosed = f"Can't find end of the entity starting at byte offset {offset}"
        if char == "\\" and text[i + 1 : i + 2] in ("_", "*", "`", "["):
            out.add(text[i + 1])
            i += 2
        elif char in "*_`":
            fence = "```" if text.startswith("```", i) else char
            end = text.find(fence, i + len(fence))
            if end < 0:
                raise EntityParseError(unclosed)
            body = text[i + len(fence) : end]
            kind = {"*": "bold", "_": "italic", "`": "code", "```": "pre"}[fence]
            entity: dict[str, Any] = {"type": kind, "offset": out.u16}
            if fence == "```":
                first, newline, rest = body.partition("\n")
                if newline and re.fullmatch(r"[\w#+.-]+", first):
                    entity["language"] = first
                    body = rest
            out.add(body)
            entities.append({**entity, "length": out.u16 - entity["offset"]})
            i = end + len(fence)
        elif char == "[":
            match = _MD_LINK_RE.match(text, i)
            if match is None:
                raise EntityParseError(unclosed)
            start = out.u16
            out.add(match.group(1))
            entities.append(
                {"type": "text_link", "offset": start, "length": out.u16 - start, "url": match[2]}
            )
            i = match.end()
        else:
            out.add(char)
            i += 1
    return _finish(out, entities)


#: the rights getChatMember lists for an administrator
_ADMIN_RIGHTS = (
    "can_be_edited",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
)
