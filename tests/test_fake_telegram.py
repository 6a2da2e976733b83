"""The fake Telegram server against the real python-telegram-bot."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import json
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ParseMode
from telegram.error import (
    BadRequest,
    Conflict,
    EndPointNotFound,
    Forbidden,
    InvalidToken,
    RetryAfter,
)
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from fakes.telegram_server import (
    TEXT_TOO_LONG,
    EntityParseError,
    FakeTelegram,
    UploadedFile,
    parse_html,
    parse_markdown_v2,
)


@pytest.fixture(autouse=True)
def _timedelta_periods(monkeypatch: pytest.MonkeyPatch) -> None:
    # PTB 22 warns (PTBDeprecationWarning) whenever a time period such as
    # RetryAfter.retry_after is read as an int, even inside RetryAfter.__init__; the
    # warnings filter turns that into an error unless timedelta mode is on.
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as server:
        yield server


@pytest.fixture
async def bot(fake: FakeTelegram) -> AsyncIterator[Bot]:
    async with Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url) as b:
        yield b


def build_app(fake: FakeTelegram) -> Application:  # type: ignore[type-arg]
    return (
        ApplicationBuilder()
        .token(fake.token)
        .base_url(fake.base_url)
        .base_file_url(fake.base_file_url)
        .build()
    )


@contextlib.asynccontextmanager
async def polling(app: Application) -> AsyncIterator[None]:  # type: ignore[type-arg]
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_polling(timeout=1, poll_interval=0)
        try:
            yield
        finally:
            await app.updater.stop()
            await app.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- polling ---------------------------------------------------------------------------


async def test_polling_reply_lands_in_texts(fake: FakeTelegram) -> None:
    app = build_app(fake)

    async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None
        await update.message.reply_text(f"echo: {update.message.text}")

    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    async with polling(app):
        fake.message(42, "hello")
        call = await fake.wait_for_call("sendMessage")

    assert fake.texts(42) == ["echo: hello"]
    assert call.params["chat_id"] == 42  # form value "42" normalized
    assert call.result["message_id"] == 2  # the user's message was 1
    assert call.result["from"]["username"] == "turbo_test_bot"
    methods = [c.method for c in fake.calls]
    assert methods[:3] == ["getMe", "deleteWebhook", "getUpdates"]
    assert fake.pending == []  # confirmed by the final getUpdates on stop


async def test_command_in_a_group_with_mention(fake: FakeTelegram) -> None:
    app = build_app(fake)
    seen: list[tuple[str, list[str], str]] = []

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.effective_chat is not None and update.message is not None
        seen.append((update.effective_chat.type, list(context.args or []), "ok"))
        await update.message.reply_text("started", do_quote=True)

    app.add_handler(CommandHandler("start", start))
    async with polling(app):
        sent = fake.message(-1001, "/start@turbo_test_bot now @bob", chat_title="Team")
        call = await fake.wait_for_call("sendMessage")

    assert seen == [("supergroup", ["now", "@bob"], "ok")]
    entities = sent["message"]["entities"]
    assert [e["type"] for e in entities] == ["bot_command", "mention"]
    assert entities[0] == {"type": "bot_command", "offset": 0, "length": 21}
    assert call.params["reply_parameters"]["message_id"] == sent["message"]["message_id"]
    assert call.result["reply_to_message"]["text"] == "/start@turbo_test_bot now @bob"
    assert fake.texts(-1001) == ["started"]


async def test_update_is_delivered_once(fake: FakeTelegram) -> None:
    app = build_app(fake)
    handled: list[int] = []

    async def record(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        handled.append(update.update_id)

    app.add_handler(MessageHandler(filters.ALL, record))
    async with polling(app):
        first = fake.message(7, "one")["update_id"]
        second = fake.message(7, "two")["update_id"]
        # a later poll confirms both (and waits, as nothing is left)
        await fake.wait_until(
            lambda: any(c.params.get("offset") == second + 1 for c in fake.calls_of("getUpdates"))
        )
        await fake.wait_until(lambda: len(handled) == 2)
        assert fake.pending == []
    assert handled == [first, second]
    assert fake.pending == []


async def test_get_updates_offset_limit_and_timeout(fake: FakeTelegram, bot: Bot) -> None:
    for text in ("a", "b", "c"):
        fake.message(5, text)
    updates = await bot.get_updates(limit=2)
    assert [u.message.text for u in updates if u.message] == ["a", "b"]
    updates = await bot.get_updates(offset=updates[-1].update_id + 1)
    assert [u.message.text for u in updates if u.message] == ["c"]
    assert len(fake.pending) == 1
    started = time.monotonic()
    short = dtm.timedelta(seconds=0.3)
    assert await bot.get_updates(offset=updates[-1].update_id + 1, timeout=short) == ()
    assert time.monotonic() - started >= 0.25
    assert fake.pending == []


async def test_long_poll_wakes_on_push(fake: FakeTelegram, bot: Bot) -> None:
    started = time.monotonic()
    fake.message(5, "early")
    pushed = await bot.get_updates(timeout=5)
    assert len(pushed) == 1 and time.monotonic() - started < 1


# -- errors ----------------------------------------------------------------------------


async def test_injected_429_surfaces_as_retry_after(fake: FakeTelegram, bot: Bot) -> None:
    fake.fail("sendMessage", status=429, retry_after=7)
    with pytest.raises(RetryAfter) as caught:
        await bot.send_message(1, "hi")
    assert caught.value.retry_after == dtm.timedelta(seconds=7)
    await bot.send_message(1, "hi again")  # times=1: the next call succeeds
    assert [c.status for c in fake.calls_of("sendMessage")] == [429, 200]
    assert fake.calls_of("sendMessage")[0].description == "Too Many Requests: retry after 7"
    assert fake.texts(1) == ["hi again"]


async def test_fail_with_condition(fake: FakeTelegram, bot: Bot) -> None:
    fake.fail("sendMessage", status=403, times=None, when=lambda p: p["chat_id"] == 2)
    await bot.send_message(1, "fine")
    for _ in range(2):
        with pytest.raises(Forbidden, match="bot was blocked by the user"):
            await bot.send_message(2, "blocked")
    assert fake.texts(1) == ["fine"] and fake.texts(2) == []


async def test_edit_rate_limit(fake: FakeTelegram, bot: Bot) -> None:
    fake.limit_edits(per_seconds=0.3, retry_after=2)
    message = await bot.send_message(3, "v1")
    with pytest.raises(RetryAfter) as caught:
        await bot.edit_message_text("v2", chat_id=3, message_id=message.message_id)
    assert caught.value.retry_after == dtm.timedelta(seconds=2)
    await bot.send_message(4, "another chat is not limited")
    await asyncio.sleep(0.31)
    await bot.edit_message_text("v2", chat_id=3, message_id=message.message_id)
    assert fake.texts(3) == ["v2"]


async def test_edit_message_text(fake: FakeTelegram, bot: Bot) -> None:
    message = await bot.send_message(9, "first")
    with pytest.raises(BadRequest, match="Message is not modified"):
        await bot.edit_message_text("first", chat_id=9, message_id=message.message_id)
    with pytest.raises(BadRequest, match="Message to edit not found"):
        await bot.edit_message_text("x", chat_id=9, message_id=999)
    edited = await bot.edit_message_text("second", chat_id=9, message_id=message.message_id)
    assert not isinstance(edited, bool) and edited.edit_date is not None
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("go", callback_data="go")]])
    # same text with a new keyboard is a change
    await bot.edit_message_text(
        "second", chat_id=9, message_id=message.message_id, reply_markup=keyboard
    )
    assert fake.messages[9][message.message_id].history == ["first", "second", "second"]
    assert fake.last_text(9) == "second"
    assert fake.calls_of("editMessageText")[-1].params["reply_markup"] == {
        "inline_keyboard": [[{"text": "go", "callback_data": "go"}]]
    }


async def test_html_and_markdown_validation(fake: FakeTelegram, bot: Bot) -> None:
    with pytest.raises(BadRequest, match="Can't parse entities"):
        await bot.send_message(1, "1 < 2", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match='Can\'t parse entities: unsupported start tag "div"'):
        await bot.send_message(1, "<div>x</div>", parse_mode=ParseMode.HTML)
    with pytest.raises(BadRequest, match=r"Can't parse entities: character '\.' is reserved"):
        await bot.send_message(1, "Done.", parse_mode=ParseMode.MARKDOWN_V2)
    html_message = await bot.send_message(
        1, "<b>bold</b> &lt;3 <a href='https://x.y/?a=1&amp;b=2'>link</a>", parse_mode="HTML"
    )
    assert html_message.text == "bold <3 link"
    assert [(e.type, e.offset, e.length) for e in html_message.entities] == [
        ("bold", 0, 4),
        ("text_link", 8, 4),
    ]
    assert html_message.entities[1].url == "https://x.y/?a=1&b=2"
    md_message = await bot.send_message(1, r"*Done*\. `a_b`", parse_mode=ParseMode.MARKDOWN_V2)
    assert md_message.text == "Done. a_b"
    assert fake.texts(1) == [
        "<b>bold</b> &lt;3 <a href='https://x.y/?a=1&amp;b=2'>link</a>",
        r"*Done*\. `a_b`",
    ]
    assert fake.texts(1, plain=True) == ["bold <3 link", "Done. a_b"]


async def test_text_length_and_emptiness(bot: Bot) -> None:
    with pytest.raises(BadRequest, match="Message is too long"):
        await bot.send_message(1, "x" * 4097)
    with pytest.raises(BadRequest, match="Message text is empty"):
        await bot.send_message(1, "  \n")
    with pytest.raises(BadRequest, match="Message text is empty"):
        await bot.send_message(1, "<b> </b>", parse_mode="HTML")
    await bot.send_message(1, "x" * 4096)
    assert TEXT_TOO_LONG.endswith("message is too long")


async def test_unknown_token_and_method(fake: FakeTelegram, bot: Bot) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.base_url}999:nope/getMe") as response:
            assert response.status == 401
            assert await response.json() == {
                "ok": False,
                "error_code": 401,
                "description": "Unauthorized",
            }
        async with session.get(f"{fake.base_url}{fake.token}/getme") as response:
            assert response.status == 200  # method names are case-insensitive
            assert (await response.json())["result"]["is_bot"] is True
    with pytest.raises(InvalidToken):
        # a Bot must be initialized (async with) or its HTTP client is never closed
        async with Bot("999:nope", base_url=fake.base_url):
            pass
    with pytest.raises(EndPointNotFound):
        await bot.do_api_request("noSuchMethod", api_kwargs={"x": 1})
    assert fake.calls_of("noSuchMethod")[0].status == 404


# -- webhook ---------------------------------------------------------------------------


async def test_webhook_mode(fake: FakeTelegram) -> None:
    app = build_app(fake)
    handled: list[str] = []

    async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert update.message is not None and update.message.text is not None
        handled.append(update.message.text)
        await update.message.reply_text("got it")

    app.add_handler(MessageHandler(filters.TEXT, echo))
    port = free_port()
    async with app:
        await app.start()
        assert app.updater is not None
        await app.updater.start_webhook(
            listen="127.0.0.1",
            port=port,
            url_path="hook",
            webhook_url=f"http://127.0.0.1:{port}/hook",
            secret_token="s3cret",
        )
        try:
            assert fake.webhook is not None
            assert fake.webhook.url == f"http://127.0.0.1:{port}/hook"
            assert fake.webhook.secret_token == "s3cret"
            info = await app.bot.get_webhook_info()
            assert info.url == fake.webhook.url

            assert await fake.deliver(fake.message(11, "via hook", push=False)) == 200
            await fake.wait_for_call("sendMessage")
            assert handled == ["via hook"]
            assert fake.texts(11) == ["got it"]

            update = fake.message(11, "forged", push=False)
            assert await fake.deliver(update, secret="wrong") == 403
            assert await fake.deliver(update, secret=None) == 403
            assert await fake.deliver(update, path="/elsewhere") == 404

            with pytest.raises(Conflict, match="webhook is active"):
                await app.bot.get_updates()
        finally:
            await app.updater.stop()
            await app.stop()
    assert handled == ["via hook"]
    assert [d.status for d in fake.deliveries] == [200, 403, 403, 404]


async def test_set_webhook_terminates_long_poll(fake: FakeTelegram, bot: Bot) -> None:
    poll = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_until(lambda: bool(fake.calls_of("getUpdates")))
    assert await bot.set_webhook("http://127.0.0.1:9/hook")
    with pytest.raises(Conflict, match="terminated by setWebhook"):
        await poll
    assert await bot.delete_webhook()
    assert await bot.get_updates() == ()


# -- drafts and the rest -----------------------------------------------------------------


async def test_send_message_draft(fake: FakeTelegram, bot: Bot) -> None:
    assert await bot.send_message_draft(chat_id=42, draft_id=7, text="partial") is True
    assert await bot.send_message_draft(chat_id=42, draft_id=7, text="partial answer") is True
    call = fake.calls_of("sendMessageDraft")[0]
    assert call.params == {"chat_id": 42, "draft_id": 7, "text": "partial"}
    assert fake.draft_texts(42, 7) == ["partial", "partial answer"]
    with pytest.raises(BadRequest, match="private chats only"):
        await bot.send_message_draft(chat_id=-100, draft_id=7, text="no")
    assert await bot.send_chat_action(42, "typing") is True


async def test_media_message_and_file_download(fake: FakeTelegram, bot: Bot) -> None:
    data = fake.message(5, caption="look @carol", media="photo")
    voice = fake.message(5, media="voice", push=False)
    update = Update.de_json(data, bot)
    assert update.message is not None
    assert update.message.caption_entities[0].type == "mention"
    photo = update.message.photo[-1]
    file = await bot.get_file(photo.file_id)
    assert bytes(await file.download_as_bytearray()).startswith(b"\xff\xd8")
    voice_update = Update.de_json(voice, bot)
    assert voice_update.message is not None and voice_update.message.voice is not None
    sticker = Update.de_json(fake.message(5, media="sticker", push=False), bot)
    assert sticker.message is not None and sticker.message.sticker is not None


async def test_edited_message_and_topics(fake: FakeTelegram, bot: Bot) -> None:
    fake.message(-1005, "in topic", message_thread_id=3)
    fake.edited_message(-1005, "in topic (edited)", message_thread_id=3)
    updates = await bot.get_updates()
    assert updates[0].message is not None
    assert updates[0].message.is_topic_message and updates[0].message.chat.is_forum
    edited = updates[1].edited_message
    assert edited is not None and edited.edit_date is not None
    assert edited.message_id == updates[0].message.message_id
    reply = await bot.send_message(-1005, "answer", message_thread_id=3)
    assert reply.message_thread_id == 3 and reply.is_topic_message


async def test_latency(fake: FakeTelegram, bot: Bot) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    await bot.send_message(1, "slow")
    assert time.monotonic() - started >= 0.2


def test_parsers() -> None:
    text, entities = parse_html("<b>a <i>😀b</i></b><pre><code class='language-py'>x</code></pre>")
    assert text == "a 😀bx"
    assert entities == [
        {"type": "bold", "offset": 0, "length": 5},
        {"type": "italic", "offset": 2, "length": 3},  # the emoji is 2 UTF-16 units
        {"type": "pre", "offset": 5, "length": 1, "language": "py"},
    ]
    for bad in ("<b>x", "<b>x</i>", "a > b", "a & b", "<span>x</span>", "x</b>"):
        with pytest.raises(EntityParseError):
            parse_html(bad)
    text, entities = parse_markdown_v2("*a _b_* __u__ ||s|| [l](https://e.x/\\)) \\!")
    assert text == "a b u s l !"
    assert [e["type"] for e in entities] == [
        "bold",
        "italic",
        "underline",
        "spoiler",
        "text_link",
    ]
    assert entities[-1]["url"] == "https://e.x/)"
    text, entities = parse_markdown_v2("```python\nprint(1)```\n>quoted\n>more\nend")
    assert text == "print(1)\nquoted\nmore\nend"
    assert entities == [
        {"type": "pre", "offset": 0, "length": 8, "language": "python"},
        {"type": "blockquote", "offset": 9, "length": 11},
    ]
    for bad in ("a.b", "*open", "1-2", "(x)", "a|b", "snake_case"):
        with pytest.raises(EntityParseError):
            parse_markdown_v2(bad)


async def test_parameter_decoding(fake: FakeTelegram) -> None:
    url = f"{fake.base_url}{fake.token}"
    markup = {"inline_keyboard": [[{"text": "a", "callback_data": "1"}]]}
    form = aiohttp.FormData()
    form.add_field("chat_id", "77")
    form.add_field("text", "42")
    form.add_field("reply_markup", json.dumps(markup))
    form.add_field("photo", b"bytes", filename="p.jpg", content_type="image/jpeg")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/sendMessage", data=form) as response:
            assert response.status == 200
        json_body = {"chat_id": "77", "text": "7", "disable_notification": True}
        async with session.post(f"{url}/sendMessage", json=json_body) as response:
            assert (await response.json())["result"]["message_id"] == 2
        async with session.get(f"{url}/sendMessage?chat_id=77&text=q&protect_content=true") as r:
            assert (await r.json())["ok"] is True
    multipart, from_json, from_query = (c.params for c in fake.calls_of("sendMessage"))
    assert multipart["chat_id"] == 77 and multipart["text"] == "42"
    assert multipart["reply_markup"] == markup
    assert isinstance(multipart["photo"], UploadedFile) and multipart["photo"].content == b"bytes"
    assert from_json == {"chat_id": 77, "text": "7", "disable_notification": True}
    assert from_query == {"chat_id": 77, "text": "q", "protect_content": True}
    assert fake.texts(77) == ["42", "7", "q"]
    assert fake.sent(77)[0].reply_markup == markup


async def test_concurrent_polls_delete_and_callback(fake: FakeTelegram, bot: Bot) -> None:
    first = asyncio.create_task(bot.get_updates(timeout=5))
    await fake.wait_until(lambda: len(fake.calls_of("getUpdates")) == 1)
    async with Bot(fake.token, base_url=fake.base_url) as second_instance:
        assert await second_instance.get_updates(timeout=0) == ()
    with pytest.raises(Conflict, match="terminated by other getUpdates request"):
        await first

    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("yes", callback_data="yes")]])
    message = await bot.send_message(8, "sure?", reply_markup=keyboard)
    update = Update.de_json(fake.callback_query(8, "yes"), bot)
    assert update.callback_query is not None and update.callback_query.data == "yes"
    assert update.callback_query.message is not None
    assert update.callback_query.message.message_id == message.message_id
    assert await bot.answer_callback_query(update.callback_query.id) is True
    assert await bot.delete_message(8, message.message_id) is True
    with pytest.raises(BadRequest, match="Message to delete not found"):
        await bot.delete_message(8, message.message_id)
    assert fake.texts(8) == []
