"""The Telegram adapter end to end: real python-telegram-bot against the fake Bot API.

Every test runs the adapter's own polling loop (or webhook server) against a fake
Telegram server on 127.0.0.1 and, where a reply is generated, the real openai client
against the fake OpenAI server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from fakes.telegram_server import FakeTelegram
from turbobot import ChannelKey, Generate, GetUserInput, System, User, turbo
from turbobot.adapters.console import ConsoleAdapter
from turbobot.adapters.telegram import MESSAGE_LIMIT, TelegramAdapter, TelegramSettings
from turbobot.bots.horoscope import horoscope
from turbobot.formatting import parse_markdown, utf16_len
from turbobot.llm.openai import OpenAILLM
from turbobot.runtime import Notices, Runtime, RuntimeSettings
from turbobot.sql import SQLStore
from turbobot.store import BaseStore, InMemoryStore
from turbobot.template import Template

PRIVATE = 4242
OTHER = 4343
GROUP = -100777
WELCOME = "Welcome, traveller. What is your zodiac sign?"


@turbo()
async def chat() -> AsyncIterator[Any]:
    yield System(content="You are a test bot.")
    while True:
        message = yield GetUserInput()
        yield User(content=message)
        yield Generate()


@turbo()
async def streamer() -> AsyncIterator[Any]:
    while True:
        message = yield GetUserInput()
        yield User(content=message)
        yield Generate(stream=True)


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(
    fake: FakeTelegram,
    template: Template,
    llm: OpenAILLM,
    store: BaseStore | None = None,
    *,
    stop_grace: float = 10.0,
    **overrides: Any,
) -> AsyncIterator[tuple[TelegramAdapter, Runtime]]:
    """The adapter polling the fake server with a runtime behind it; stopped after."""
    options: dict[str, Any] = {"poll_timeout": 1, "stream_interval": 0.2, **overrides}
    settings = TelegramSettings(token=fake.token, base_url=fake.base_url, **options)
    store = store or InMemoryStore()
    async with TelegramAdapter(settings) as adapter:
        runtime_settings = RuntimeSettings(bot_username=adapter.username, stop_grace=stop_grace)
        async with Runtime(
            template, llm=llm, sender=adapter, store=store, settings=runtime_settings
        ) as runtime:
            task = asyncio.create_task(adapter.run(runtime, handle_signals=False))
            try:
                yield adapter, runtime
            finally:
                adapter.stop()
                await asyncio.wait_for(task, 10)


async def replies(fake: FakeTelegram, chat_id: int, count: int) -> list[str]:
    """Wait until the bot has ``count`` messages in the chat; their texts as shown."""
    await fake.wait_until(lambda: len(fake.sent(chat_id)) >= count, timeout=10)
    return fake.texts(chat_id, plain=True)


async def test_two_turn_conversation_in_a_private_chat(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(telegram, horoscope, openai_llm, store) as (adapter, _runtime),
    ):
        assert adapter.username == "turbo_test_bot"
        await telegram.wait_for_call("setMyCommands")
        assert [c["command"] for c in telegram.commands] == [
            "start",
            "reset",
            "retry",
            "cancel",
            "usage",
            "help",
        ]
        telegram.message(PRIVATE, "hi")
        assert await replies(telegram, PRIVATE, 1) == [WELCOME]
        telegram.message(PRIVATE, "I am a leo")
        telegram.message(PRIVATE, "will I be rich?")  # type-ahead: waits its turn
        texts = await replies(telegram, PRIVATE, 3)
        assert texts == [WELCOME, "Ah, Leo. What do you want to know?", "echo: will I be rich?"]
        # every update was confirmed (offset moved past it) once it was committed
        await telegram.wait_until(lambda: not telegram.pending)
        lines = await store.transcript(ChannelKey("telegram", str(PRIVATE)))
    assert [(line.role, line.text) for line in lines] == [
        ("user", "hi"),
        ("assistant", WELCOME),
        ("user", "I am a leo"),
        ("assistant", "Ah, Leo. What do you want to know?"),
        ("user", "will I be rich?"),
        ("assistant", "echo: will I be rich?"),
    ]
    assert len(openai_server.requests) == 1


async def test_groups_answer_mentions_replies_and_commands_per_user(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    async with running(telegram, horoscope, openai_llm):
        telegram.message(GROUP, "hello everyone", user_id=1)
        telegram.message(GROUP, "/start@some_other_bot", user_id=1)
        telegram.message(GROUP, "@turbo_test_bot hi there", user_id=1)
        assert await replies(telegram, GROUP, 1) == [WELCOME]
        # another member gets a conversation of their own (the sign wakes it directly)
        telegram.message(GROUP, "@turbo_test_bot I am a Pisces", user_id=2, first_name="Bob")
        assert (await replies(telegram, GROUP, 2))[1] == "Ah, Pisces. What do you want to know?"
        # a reply to the bot counts without a mention
        welcome = telegram.sent(GROUP)[0]
        telegram.message(GROUP, "leo", user_id=1, reply_to_message=welcome)
        assert (await replies(telegram, GROUP, 3))[2] == "Ah, Leo. What do you want to know?"
        # a plain message in the group is not for the bot
        telegram.message(GROUP, "leo is my sign btw", user_id=3)
        telegram.message(GROUP, "/help", user_id=3)
        texts = await replies(telegram, GROUP, 4)
    assert len(texts) == 4 and texts[3].startswith("I am Madame Turbo")
    replied_to = [c.params.get("chat_id") for c in telegram.calls_of("sendMessage")]
    assert replied_to == [GROUP] * 4


async def test_shared_group_mode_prefixes_speakers(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    async with running(telegram, chat, openai_llm, group_mode="shared"):
        telegram.message(GROUP, "@turbo_test_bot hello", user_id=1, first_name="Ann")
        assert await replies(telegram, GROUP, 1) == ["echo: Ann: hello"]
        telegram.message(GROUP, "@turbo_test_bot hi", user_id=2, first_name="Bob")
        assert (await replies(telegram, GROUP, 2))[1] == "echo: Bob: hi"
    # one conversation: the second request carries the first exchange
    users = [m["content"] for m in openai_server.requests[1]["messages"] if m["role"] == "user"]
    assert users == ["Ann: hello", "Bob: hi"]


async def test_in_a_shared_group_only_the_starter_or_a_chat_admin_resets(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    telegram.admins[GROUP] = {7: "administrator", 8: "creator"}
    reset, refused = Notices().reset, Notices().not_yours
    async with running(telegram, chat, openai_llm, group_mode="shared"):
        telegram.message(GROUP, "@turbo_test_bot hello", user_id=1, first_name="Ann")
        telegram.message(GROUP, "/reset", user_id=2, first_name="Bob")
        assert await replies(telegram, GROUP, 2) == ["echo: Ann: hello", refused]
        for admin in (7, 8):
            telegram.message(GROUP, "@turbo_test_bot again", user_id=1, first_name="Ann")
            telegram.message(GROUP, "/reset", user_id=admin, first_name="Mod")
        telegram.message(GROUP, "@turbo_test_bot again", user_id=1, first_name="Ann")
        telegram.message(GROUP, "/reset", user_id=1, first_name="Ann")
        texts = await replies(telegram, GROUP, 8)
    assert texts[2:] == ["echo: Ann: again", reset] * 3
    asked = [c.params["user_id"] for c in telegram.calls_of("getChatMember")]
    assert [int(user) for user in asked] == [2, 7, 8]  # never for the starter


async def test_a_10000_character_reply_is_split_at_the_limit(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    code = "\n".join(f"value_{i} = {i} * 2  # <not html> & fine" for i in range(60))
    paragraphs = [f"Paragraph {i}: " + "**bold** words and more words. " * 24 for i in range(12)]
    long_reply = "\n\n".join([*paragraphs[:6], f"```python\n{code}\n```", *paragraphs[6:]])
    assert len(long_reply) > 10_000
    openai_server.script(long_reply)
    async with running(telegram, chat, openai_llm):
        telegram.message(PRIVATE, "write a lot")
        await telegram.wait_for_call("sendMessage", count=3)
        await asyncio.sleep(0.3)  # nothing more comes
        sent = telegram.sent(PRIVATE)
    assert len(sent) == 3 and len(parse_markdown(long_reply).text) > 2 * MESSAGE_LIMIT
    assert all(0 < utf16_len(m.plain) <= MESSAGE_LIMIT for m in sent)
    expected = parse_markdown(long_reply).text
    # parts are cut at paragraph or line breaks, so joining them back loses nothing
    assert "\n".join(m.plain for m in sent).replace("\n\n", "\n") == expected.replace("\n\n", "\n")
    kinds = {e["type"] for m in sent for e in m.entities or []}
    assert {"bold", "pre"} <= kinds
    # the code block is code wherever it landed: no line of it outside a pre entity
    for message in sent:
        for line in message.plain.split("\n"):
            if line.startswith("value_"):
                start = message.plain.index(line)
                assert any(
                    e["type"] == "pre" and e["offset"] <= start < e["offset"] + e["length"]
                    for e in message.entities or []
                )


async def test_rejected_formatting_falls_back_to_plain_text(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    openai_server.script("Here is **bold** and `code`.")
    telegram.fail(
        "sendMessage",
        status=400,
        description="Bad Request: can't parse entities: unsupported entity",
        when=lambda params: "entities" in params,
    )
    async with running(telegram, chat, openai_llm):
        telegram.message(PRIVATE, "format please")
        assert await replies(telegram, PRIVATE, 1) == ["Here is bold and code."]
    statuses = [c.status for c in telegram.calls_of("sendMessage")]
    assert statuses == [400, 200]


async def test_streaming_edits_converge_to_the_final_text_under_429s(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    final = " ".join(f"word{i}" for i in range(120))
    openai_server.script(Reply(content=final, chunk_delay=0.01))
    telegram.limit_edits(per_seconds=1.0, retry_after=1)
    async with running(telegram, streamer, openai_llm, stream_interval=0.2):
        telegram.message(GROUP, "/start", user_id=1)
        await replies(telegram, GROUP, 1)
        telegram.message(GROUP, "@turbo_test_bot stream it", user_id=1)
        await telegram.wait_until(
            lambda: len(telegram.sent(GROUP)) == 2 and telegram.sent(GROUP)[1].plain == final,
            timeout=15,
        )
    edits = telegram.calls_of("editMessageText")
    assert any(c.status == 429 for c in [*edits, *telegram.calls_of("sendMessage")])
    assert edits and edits[-1].status == 200 and edits[-1].params["text"] == final
    stream_message = telegram.sent(GROUP)[1]
    assert len(stream_message.history) >= 2  # it grew before it was complete


async def test_streaming_in_a_private_chat_uses_drafts(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    final = " ".join(f"token{i}" for i in range(80))
    openai_server.script(Reply(content=final, chunk_delay=0.01))
    async with running(telegram, streamer, openai_llm, stream_interval=0.1):
        telegram.message(PRIVATE, "stream it")
        assert await replies(telegram, PRIVATE, 1) == [final]
    drafts = telegram.draft_texts(PRIVATE)
    assert len(drafts) >= 2
    assert all(final.startswith(d) for d in drafts) and drafts[0] != final
    assert not telegram.calls_of("editMessageText")


async def test_streaming_falls_back_to_edits_without_drafts(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    final = " ".join(f"token{i}" for i in range(80))
    openai_server.script(Reply(content=final, chunk_delay=0.01))
    telegram.fail("sendMessageDraft", status=404, description="Not Found", times=None)
    async with running(telegram, streamer, openai_llm, stream_interval=0.1):
        telegram.message(PRIVATE, "stream it")
        await telegram.wait_until(
            lambda: telegram.texts(PRIVATE, plain=True) == [final], timeout=10
        )
    assert len(telegram.calls_of("sendMessageDraft")) == 1  # tried once, then edits
    assert telegram.calls_of("editMessageText")


async def test_a_429_in_one_chat_does_not_stall_another(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    telegram.fail("sendMessage", status=429, retry_after=2, when=lambda p: p["chat_id"] == OTHER)
    async with running(telegram, horoscope, openai_llm):
        started = time.monotonic()
        telegram.message(OTHER, "hi")
        await telegram.wait_for_call("sendMessage", when=lambda p: p["chat_id"] == OTHER)
        telegram.message(PRIVATE, "hi")
        assert await replies(telegram, PRIVATE, 1) == [WELCOME]
        quick = time.monotonic() - started
        assert await replies(telegram, OTHER, 1) == [WELCOME]
        waited = time.monotonic() - started
    assert quick < 1.5 <= waited


async def test_duplicate_updates_are_handled_once(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    async with running(telegram, chat, openai_llm):
        update = telegram.message(PRIVATE, "only once", message_id=77)
        telegram.push({"message": update["message"]})  # redelivered: new update_id
        assert await replies(telegram, PRIVATE, 1) == ["echo: only once"]
        telegram.message(PRIVATE, "next")
        assert await replies(telegram, PRIVATE, 2) == ["echo: only once", "echo: next"]
    assert len(openai_server.requests) == 2


async def test_media_edits_and_bots(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(telegram, chat, openai_llm, store),
    ):
        telegram.message(PRIVATE, media="sticker")
        texts = await replies(telegram, PRIVATE, 1)
        assert texts == ["I can only read text messages, sorry: please type your message."]
        telegram.message(PRIVATE, media="photo", caption="what is this?")
        assert (await replies(telegram, PRIVATE, 2))[1] == "echo: what is this?"
        telegram.edited_message(PRIVATE, "an edit", message_id=1)
        telegram.message(PRIVATE, "from a bot", from_bot=True, user_id=999)
        telegram.message(PRIVATE, "last")
        texts = await replies(telegram, PRIVATE, 3)
        recovery = await store.recovery()
    assert texts[2:] == ["echo: last"]
    assert len(openai_server.requests) == 2
    assert recovery.inbox == []  # the sticker was stored and answered, not left pending


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_webhook_mode_checks_the_secret_and_commits_before_200(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    port = _free_port()
    async with running(
        telegram,
        chat,
        openai_llm,
        webhook_url=f"http://127.0.0.1:{port}/telegram/hook",
        listen="127.0.0.1",
        port=port,
        secret_token="s3cret-Token",
    ):
        call = await telegram.wait_for_call("setWebhook")
        assert call.params["secret_token"] == "s3cret-Token"
        update = telegram.message(PRIVATE, "via webhook", push=False)
        assert await telegram.deliver(update, secret="wrong") == 403
        assert await telegram.deliver(update, secret=None) == 403
        assert await telegram.deliver(update) == 200
        assert await replies(telegram, PRIVATE, 1) == ["echo: via webhook"]
        assert await telegram.deliver(update) == 200  # a redelivery: acknowledged, not handled
        await asyncio.sleep(0.3)
    assert telegram.texts(PRIVATE) == ["echo: via webhook"]
    assert len(openai_server.requests) == 1
    assert not telegram.calls_of("getUpdates")


async def test_the_same_template_gives_the_same_transcript_in_console_and_telegram(
    telegram: FakeTelegram, openai_llm: OpenAILLM
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

    async with running(telegram, horoscope, openai_llm):
        for line in lines:
            telegram.message(PRIVATE, line)
        telegram_replies = await replies(telegram, PRIVATE, len(console_replies))
    assert console_replies == [
        WELCOME,
        "Ah, Virgo. What do you want to know?",
        "echo: love?",
        "echo: money?",
    ]
    assert telegram_replies == console_replies


async def test_secrets_never_reach_the_logs(
    telegram: FakeTelegram, openai_llm: OpenAILLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    telegram.fail("getUpdates", status=502, description="Bad Gateway")
    async with running(telegram, horoscope, openai_llm):
        telegram.message(PRIVATE, "hi")
        await replies(telegram, PRIVATE, 1)
        logging.getLogger("turbobot.adapters.telegram").warning("url %s", f"/bot{telegram.token}/x")
    assert "getUpdates failed" in caplog.text
    assert telegram.token not in caplog.text
    assert "<redacted>" in caplog.text


def test_settings_errors_are_clear() -> None:
    with pytest.raises(Exception, match="TELEGRAM_BOT_TOKEN is not set"):
        TelegramSettings(token="")
    with pytest.raises(Exception, match="needs a secret token"):
        TelegramSettings(token="1:x", webhook_url="https://example.org/hook")
    with pytest.raises(Exception, match="needs a secret token"):
        TelegramSettings(token="1:x", webhook_url="https://e.org/h", secret_token="bad secret!")
    assert "1:x" not in repr(TelegramSettings(token="1:x"))
    with pytest.raises(Exception, match="must start with https://") as raised:
        TelegramSettings(token="1:x", webhook_url="ftp://e.org/bot1:x", secret_token="s")
    assert "1:x" not in str(raised.value)  # the URL, which may hold the token, is not echoed


async def test_a_wrong_token_is_a_configuration_error(telegram: FakeTelegram) -> None:
    settings = TelegramSettings(token="999:wrong", base_url=telegram.base_url)
    with pytest.raises(Exception, match="Telegram refused the bot token") as raised:
        async with TelegramAdapter(settings):
            pass
    assert "999:wrong" not in str(raised.value)


async def test_forum_topics_are_channels_of_their_own(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    async with running(telegram, horoscope, openai_llm):
        for topic in (11, 22):
            telegram.message(
                GROUP,
                "@turbo_test_bot hi",
                user_id=1,
                message_thread_id=topic,
                is_topic_message=True,
                is_forum=True,
            )
        await replies(telegram, GROUP, 2)
        telegram.message(
            GROUP,
            "@turbo_test_bot leo",
            user_id=1,
            message_thread_id=22,
            is_topic_message=True,
            is_forum=True,
        )
        texts = await replies(telegram, GROUP, 3)
    assert texts == [WELCOME, WELCOME, "Ah, Leo. What do you want to know?"]
    threads = [c.params.get("message_thread_id") for c in telegram.calls_of("sendMessage")]
    assert threads == [11, 22, 22]


async def test_typing_is_shown_while_the_model_works(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    openai_server.script(Reply("done thinking", delay=1.2))
    async with running(telegram, chat, openai_llm):
        telegram.message(PRIVATE, "think hard")
        assert await replies(telegram, PRIVATE, 1) == ["done thinking"]
    actions = telegram.calls_of("sendChatAction")
    assert actions and all(c.params["action"] == "typing" for c in actions)
    assert actions[0].params["chat_id"] == PRIVATE


async def test_all_chats_together_stay_under_the_global_rate(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    chats = [PRIVATE + i for i in range(30)]
    async with running(telegram, horoscope, openai_llm, rate=20.0):
        for chat_id in chats:
            telegram.message(chat_id, "hi")
        await telegram.wait_until(lambda: len(telegram.calls_of("sendMessage")) == 30, timeout=10)
    times = sorted(c.time for c in telegram.calls_of("sendMessage"))
    # a burst of 20 at once, then 20 a second: message 20 + k leaves k/20 s later (the
    # server sees arrivals, which connection set-up can bunch by a few tens of ms)
    for i in range(24, 30):
        assert times[i] - times[0] >= (i - 19) / 20 - 0.1, i
    assert times[19] - times[0] < 0.3


@pytest.mark.parametrize("reader", ["raw", "ptb"])
async def test_an_unreadable_update_is_logged_and_skipped(
    reader: str,
    telegram: FakeTelegram,
    openai_llm: OpenAILLM,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whichever reader fails: the raw one, or PTB's objects and ``to_incoming``."""
    import turbobot.adapters.telegram as module

    async with running(telegram, chat, openai_llm) as (adapter, _runtime):
        read, read_raw = adapter.to_incoming, module.read_private

        def fragile_raw(update: Any) -> Any:
            if reader == "ptb":
                raise module.NotPlain
            if update.get("message", {}).get("text") == "odd":
                raise ValueError("an update this version cannot read")
            return read_raw(update)

        monkeypatch.setattr(module, "read_private", fragile_raw)

        def fragile(update: Any) -> Any:
            if update.message is not None and update.message.text == "odd":
                raise ValueError("an update this version cannot read")
            return read(update)

        monkeypatch.setattr(adapter, "to_incoming", fragile)
        telegram.message(PRIVATE, "odd")
        telegram.message(PRIVATE, "fine")
        assert await replies(telegram, PRIVATE, 1) == ["echo: fine"]
    assert "could not be read" in caplog.text


async def test_a_webhook_port_in_use_is_a_configuration_error(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = TelegramSettings(
            token=telegram.token,
            base_url=telegram.base_url,
            webhook_url=f"http://127.0.0.1:{port}/hook",
            listen="127.0.0.1",
            port=port,
            secret_token="s3cret",
        )
        async with (
            TelegramAdapter(settings) as adapter,
            Runtime(chat, llm=openai_llm, sender=adapter, store=InMemoryStore()) as runtime,
        ):
            with pytest.raises(Exception, match="cannot listen for the webhook"):
                await adapter.run(runtime, handle_signals=False)


async def test_a_user_who_blocked_the_bot_is_not_retried_for_ever(
    telegram: FakeTelegram,
    openai_llm: OpenAILLM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    telegram.fail(
        "sendMessage",
        status=403,
        description="Forbidden: bot was blocked by the user",
        when=lambda p: p["chat_id"] == PRIVATE,
    )
    async with (
        SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}") as store,
        running(telegram, chat, openai_llm, store) as (_adapter, runtime),
    ):
        telegram.message(PRIVATE, "hello?")
        await telegram.wait_for_call("sendMessage")
        await runtime.join()
        recovery = await store.recovery()
    assert recovery.unsent == []  # dropped, not kept to be sent at every start
    assert "cannot be delivered" in caplog.text
    assert [c.status for c in telegram.calls_of("sendMessage")] == [403]  # not retried


async def test_a_reply_whose_markup_leaves_nothing_visible_goes_as_written(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    openai_server.script("```\n\n```")
    async with running(telegram, chat, openai_llm):
        telegram.message(PRIVATE, "show me an empty block")
        assert await replies(telegram, PRIVATE, 1) == ["```\n\n```"]


async def test_a_broken_off_stream_stays_on_screen_marked_interrupted(
    telegram: FakeTelegram,
) -> None:
    """Issue 10, defect 5: the fragment is not left looking like a finished answer."""
    from turbobot import LLMUnavailableError
    from turbobot.llm.base import LLMResponse
    from turbobot.template import INTERRUPTED

    class BreaksOff:
        calls = 0

        async def complete(self, request: Any, *, on_delta: Any = None) -> LLMResponse:
            self.calls += 1
            if self.calls > 1:
                return LLMResponse("Complete answer.", (), None, "stop")
            await on_delta("The answer is ")
            # the preview reaches the chat before the connection breaks
            await telegram.wait_until(lambda: len(telegram.sent(GROUP)) >= 2, timeout=10)
            raise LLMUnavailableError("the stream broke off after 14 characters")

        async def aclose(self) -> None:
            return None

    llm: Any = BreaksOff()
    # stream_interval=0: the first fragment is shown at once
    async with running(telegram, streamer, llm, stream_interval=0.0) as (_, runtime):
        telegram.message(GROUP, "/start", user_id=1)
        await replies(telegram, GROUP, 1)
        telegram.message(GROUP, "@turbo_test_bot stream it", user_id=1)
        texts = await replies(telegram, GROUP, 3)
        assert texts[1] == f"The answer is {INTERRUPTED}"
        assert texts[2] == runtime.settings.notices.apology
        lines = await runtime.store.transcript(ChannelKey("telegram", str(GROUP), None, "1"))
        assert f"The answer is {INTERRUPTED}" in [line.text for line in lines]


async def test_a_stop_that_abandons_a_stream_takes_its_preview_away(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    """The abandoned step is done again, whole, on the next start: a half preview left
    in the chat would be read twice."""
    words = " ".join(f"word{i}" for i in range(200))
    openai_server.script(Reply(content=words, chunk_delay=0.05))
    async with running(telegram, streamer, openai_llm, stream_interval=0.05, stop_grace=0.3):
        telegram.message(GROUP, "/start", user_id=1)
        await replies(telegram, GROUP, 1)
        telegram.message(GROUP, "@turbo_test_bot stream it", user_id=1)
        await telegram.wait_until(lambda: len(telegram.sent(GROUP)) == 2, timeout=10)
        assert telegram.sent(GROUP)[1].plain != words
    assert len(telegram.sent(GROUP)) == 1  # the greeting; the preview is gone
    assert telegram.calls_of("deleteMessage")
