"""The Telegram adapter reads updates from Telegram's JSON without building PTB objects
where it can (``read_private``); both ways must give the same ``IncomingMessage``.

The corpus (tests/data/telegram_updates.json) holds real update shapes: private chats
with text, captions and every media kind, commands, groups and topics with mentions
after astral characters, replies, edits, anonymous admins, channel posts, service
messages, bots, other update kinds and fields Telegram may add later."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from telegram import Update

from turbobot.adapters.telegram import NotPlain, TelegramAdapter, TelegramSettings, read_private
from turbobot.chat import IncomingMessage

CORPUS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "telegram_updates.json").read_text(encoding="utf-8")
)
TOKEN = "123456789:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def adapter(**settings: Any) -> TelegramAdapter:
    made = TelegramAdapter(TelegramSettings(TOKEN, **settings))
    made.username, made.bot_id = "bench_bot", 123456789  # what getMe would set
    return made


def through_ptb(made: TelegramAdapter, update: dict[str, Any]) -> IncomingMessage | None:
    return made._convert(Update.de_json(json.loads(json.dumps(update)), made.bot))


@pytest.mark.parametrize("settings", [{}, {"group_mode": "shared", "trigger": "jarvis"}])
@pytest.mark.parametrize("entry", CORPUS, ids=[e["name"] for e in CORPUS])
def test_raw_reading_gives_what_ptb_objects_give(
    entry: dict[str, Any], settings: dict[str, Any]
) -> None:
    made = adapter(**settings)
    update = entry["update"]
    assert made._convert_raw(json.loads(json.dumps(update))) == through_ptb(made, update)


def test_the_corpus_covers_every_case_and_the_fast_path_takes_private_chats() -> None:
    made = adapter()
    read = {e["name"]: through_ptb(made, e["update"]) for e in CORPUS}
    fast, deferred = set(), set()
    for entry in CORPUS:
        try:
            read_private(entry["update"])
        except NotPlain:
            deferred.add(entry["name"])
        else:
            fast.add(entry["name"])
    # every private message and every update kind the bot ignores is read directly
    assert {n for n in read if n.startswith("private-")} <= fast
    assert {"channel-post", "callback-query", "my-chat-member"} <= fast
    # messages in groups go through PTB (entities, mentions, replies to the bot)
    in_groups = {
        e["name"]
        for e in CORPUS
        if e["update"].get("message", {}).get("chat", {}).get("type") in ("group", "supergroup")
    }
    assert len(in_groups) >= 20
    assert in_groups == deferred
    # and the corpus holds both answers: messages for the bot, and updates that are not
    assert sum(m is not None for m in read.values()) >= 25
    assert sum(m is None for m in read.values()) >= 10
    kinds = {a.kind for m in read.values() if m is not None for a in m.attachments}
    from turbobot.adapters.telegram import _MEDIA

    assert kinds == set(_MEDIA)
    assert any(m is not None and m.key.thread for m in read.values())
    assert any(m is not None and m.reply_to for m in read.values())
    assert any(m is not None and m.is_bot for m in read.values())


MALFORMED = [
    {"update_id": 1, "message": "text"},
    {"update_id": 2, "message": {"chat": "private"}},
    {
        "update_id": 3,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": "7", "type": "private"},
            "text": "hi",
            "from": {"id": 7, "is_bot": False, "first_name": "A"},
        },
    },
    {
        "update_id": 4,
        "message": {
            "message_id": 1,
            "date": "now",
            "chat": {"id": 7, "type": "private"},
            "text": "hi",
            "from": {"id": 7, "is_bot": False, "first_name": "A"},
        },
    },
    {
        "update_id": 5,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 7, "type": "private"},
            "text": 5,
            "from": {"id": 7, "is_bot": False, "first_name": "A"},
        },
    },
    {
        "update_id": 6,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 7, "type": "private"},
            "text": "hi",
            "from": {"id": 7},
        },
    },
    {
        "update_id": 7,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 7, "type": "private"},
            "text": "hi",
            "from": {"id": 7, "is_bot": False, "first_name": "A"},
            "reply_to_message": 3,
        },
    },
    {
        "update_id": 8,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 7, "type": "group"},
            "text": "hi",
            "from": None,
            "entities": "x",
        },
    },
    {
        "update_id": 9,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 7, "type": "private"},
            "text": "\ud800 hi",
            "from": {"id": 7, "is_bot": False, "first_name": "\x00A"},
            "is_topic_message": True,
            "message_thread_id": "x",
        },
    },
]


@pytest.mark.parametrize("update", MALFORMED, ids=[str(u["update_id"]) for u in MALFORMED])
def test_a_malformed_update_is_skipped_or_read_never_raised(
    update: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """What Telegram would never send still cannot stop the polling loop: the fast path
    leaves it to PTB, and what PTB cannot read is logged and skipped."""
    made = adapter()
    with caplog.at_level(logging.ERROR, logger="turbobot.adapters.telegram"):
        got = made._convert_raw(update)
    assert got is None or isinstance(got, IncomingMessage)
    if got is None and update["update_id"] in (3, 4, 5, 6):
        # PTB could not read these either: the skip is logged with the update's id
        assert f"skipped update {update['update_id']}" in caplog.text
