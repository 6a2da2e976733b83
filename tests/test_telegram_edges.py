"""Edge cases of the Telegram adapter found in review: failed previews, odd updates,
mentions, anonymous admins, URLs in Markdown, unusual getUpdates answers, shutdown."""

from __future__ import annotations

from typing import Any

import pytest
from telegram import Update

from fakes.openai_server import FakeOpenAI, Reply
from fakes.telegram_server import FakeTelegram
from tests.test_telegram import GROUP, PRIVATE, chat, running, streamer
from turbobot.adapters.telegram import TelegramAdapter, TelegramSettings, _preview
from turbobot.formatting import parse_markdown
from turbobot.llm.openai import OpenAILLM

BOT_ID = 5555


@pytest.fixture
async def telegram() -> Any:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def offline() -> Any:
    """An adapter that is never initialized (no network): only to_incoming is used."""
    fake = FakeTelegram()
    adapter = TelegramAdapter(TelegramSettings(token="123:abc", group_mode="shared"))
    adapter.username, adapter.bot_id = "turbo_test_bot", BOT_ID
    try:
        yield fake, adapter
    finally:
        for request in adapter._requests:
            await request.shutdown()


def _update(adapter: TelegramAdapter, message: dict[str, Any]) -> Update:
    update = Update.de_json({"update_id": 1, "message": message}, adapter.bot)
    assert update is not None
    return update


# -- streaming ------------------------------------------------------------------------


async def test_a_failed_streaming_preview_edit_does_not_lose_the_reply(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    """One 502 on a best-effort preview edit (a NetworkError in PTB) must not abort
    the stream: the reply should still end as the complete text."""
    final = " ".join(f"word{i}" for i in range(120))
    openai_server.script(Reply(content=final, chunk_delay=0.01))
    telegram.fail("editMessageText", status=502, description="Bad Gateway", times=1)
    async with running(telegram, streamer, openai_llm, stream_interval=0.2):
        telegram.message(GROUP, "/start", user_id=1)
        await telegram.wait_until(lambda: len(telegram.sent(GROUP)) >= 1, timeout=10)
        telegram.message(GROUP, "@turbo_test_bot stream it", user_id=1)
        await telegram.wait_until(
            lambda: any(c.status == 502 for c in telegram.calls_of("editMessageText")),
            timeout=10,
        )
        await telegram.wait_until(
            lambda: len(telegram.sent(GROUP)) == 2 and telegram.sent(GROUP)[1].plain == final,
            timeout=5,
        )


async def test_a_failed_draft_does_not_lose_the_reply(
    telegram: FakeTelegram, openai_llm: OpenAILLM, openai_server: FakeOpenAI
) -> None:
    final = " ".join(f"token{i}" for i in range(80))
    openai_server.script(Reply(content=final, chunk_delay=0.01))
    telegram.fail("sendMessageDraft", status=500, description="Internal Server Error", times=1)
    async with running(telegram, streamer, openai_llm, stream_interval=0.1):
        telegram.message(PRIVATE, "stream it")
        await telegram.wait_until(lambda: telegram.texts(PRIVATE, plain=True) == [final], timeout=5)


def test_preview_of_a_long_whitespace_stream_is_empty() -> None:
    assert _preview(" " * 5000) == ""


async def test_shared_mode_media_without_text_gets_no_speaker_prefix(offline: Any) -> None:
    """In shared mode a photo replying to the bot stays text-less (the runtime answers it
    with the text-only notice) instead of becoming the input "Alice: "."""
    fake, adapter = offline
    bot_message = {
        "message_id": 1,
        "date": 0,
        "chat": {"id": GROUP, "type": "supergroup", "title": "g"},
        "from": {"id": BOT_ID, "is_bot": True, "first_name": "Bot"},
        "text": "What is your sign?",
    }
    msg = fake.message(GROUP, media="photo", reply_to_message=bot_message, push=False)["message"]
    incoming = adapter.to_incoming(_update(adapter, msg))
    assert incoming is not None
    assert not incoming.text.strip()


async def test_a_bare_mention_is_text_not_media(offline: Any) -> None:
    fake, adapter = offline
    msg = fake.message(GROUP, "@turbo_test_bot", push=False)["message"]
    incoming = adapter.to_incoming(_update(adapter, msg))
    assert incoming is not None
    assert incoming.text.strip() not in ("", "Alice:")


async def test_every_mention_of_the_bot_is_removed(offline: Any) -> None:
    fake, adapter = offline
    text = "a  @turbo_test_bot hello @turbo_test_bot"
    msg = fake.message(GROUP, text, push=False)["message"]
    incoming = adapter.to_incoming(_update(adapter, msg))
    assert incoming is not None
    assert "@turbo_test_bot" not in incoming.text


async def test_anonymous_group_admins_are_people_not_bots(offline: Any) -> None:
    """Anonymous admins post as GroupAnonymousBot (is_bot) with sender_chat = the group."""
    fake, adapter = offline
    msg = fake.message(GROUP, "@turbo_test_bot hi", push=False)["message"]
    msg["from"] = {
        "id": 1087968824,
        "is_bot": True,
        "first_name": "Group",
        "username": "GroupAnonymousBot",
    }
    msg["sender_chat"] = {"id": GROUP, "type": "supergroup", "title": "g"}
    incoming = adapter.to_incoming(_update(adapter, msg))
    assert incoming is not None and not incoming.is_bot


def test_underscores_in_paths_and_urls_stay() -> None:
    text = "open http://example.com/_next_/static or /tmp/_build_/x"
    assert parse_markdown(text).text == text


def test_links_may_contain_parentheses() -> None:
    formatted = parse_markdown("[Foo](https://en.wikipedia.org/wiki/Foo_(bar))")
    assert formatted.text == "Foo"


async def test_a_non_network_telegram_error_from_get_updates_does_not_stop_the_bot(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    """A proxy answering getUpdates with a non-JSON 200 body makes PTB raise a plain
    TelegramError ("Invalid server response"): the bot logs it and polls again."""
    import asyncio

    from turbobot.runtime import Runtime
    from turbobot.store import InMemoryStore

    settings = TelegramSettings(token=telegram.token, base_url=telegram.base_url, poll_timeout=1)
    async with (
        TelegramAdapter(settings) as adapter,
        Runtime(chat, llm=openai_llm, sender=adapter, store=InMemoryStore()) as runtime,
    ):
        polling = adapter._requests[1]
        real = polling.do_request
        left = [1]

        async def flaky(*args: Any, **kwargs: Any) -> tuple[int, bytes]:
            if left[0] and "getUpdates" in kwargs.get("url", ""):
                left[0] -= 1
                return 200, b"<html>proxy error</html>"
            return await real(*args, **kwargs)

        polling.do_request = flaky  # type: ignore[method-assign]
        task = asyncio.create_task(adapter.run(runtime, handle_signals=False))
        await asyncio.sleep(1.5)
        telegram.message(PRIVATE, "still there?")
        try:
            await telegram.wait_until(lambda: len(telegram.sent(PRIVATE)) >= 1, timeout=5)
        finally:
            adapter.stop()
            await asyncio.wait([task], timeout=10)
            if task.done() and task.exception() is not None:
                raise AssertionError(f"polling loop died: {task.exception()!r}")


async def test_shutdown_does_not_wait_out_long_429s(
    telegram: FakeTelegram, openai_llm: OpenAILLM
) -> None:
    """A reply stuck behind 429s does not hold up SIGTERM: it stays in the outbox."""
    import time

    telegram.fail("sendMessage", status=429, retry_after=3, times=None)
    started = 0.0
    async with running(telegram, chat, openai_llm):
        telegram.message(PRIVATE, "hi")
        await telegram.wait_for_call("sendMessage")
        started = time.monotonic()
    took = time.monotonic() - started
    assert took < 3, f"shutdown took {took:.1f} s"
