"""The admin page's queries on SQLite and PostgreSQL, and its plots."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from turbobot import Generate, GetUserInput, ScriptedLLM, User, turbo
from turbobot.admin import check_token, plots
from turbobot.admin.queries import PAGE, SPLIT_AT, AdminData, Filters, percentile
from turbobot.clock import FakeClock
from turbobot.exceptions import ConfigurationError
from turbobot.llm.base import LLMRequest, LLMResponse
from turbobot.messages import Usage
from turbobot.sql import SQLStore
from turbobot.testing import BotSession

NOW = time.time()


@turbo(model="m1")
async def echo():
    while True:
        said = yield GetUserInput()
        yield User(said)
        yield Generate()


def _model(clock: FakeClock) -> ScriptedLLM:
    def respond(request: LLMRequest) -> LLMResponse:
        clock.advance(0.1)
        return LLMResponse("ok 100% _done_", usage=Usage(3, 2), model=request.model)

    return ScriptedLLM(respond=respond)


@pytest.fixture
async def data(store_url: str) -> AsyncIterator[AdminData]:
    """A database with PAGE + 5 conversations of one message each, a minute apart."""
    clock = FakeClock(NOW - 3600)
    store = SQLStore(store_url, upgrade=True)
    await store.open()
    try:
        chat = BotSession(echo, llm=_model(clock), store=store, clock=clock, platform="telegram")
        async with chat:
            for i in range(PAGE + 5):
                await chat.say(f"hello {i}% _x_", channel=f"c{i}", author=f"u{i % 3}")
                clock.advance(60)
            await store.flush()
    finally:
        await store.aclose()
    engine = create_async_engine(store_url)
    try:
        yield AdminData(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_pages_of_conversations_filters_and_search(data: AdminData) -> None:
    first, after = await data.conversations(Filters())
    assert len(first) == PAGE and after is not None
    assert [r["channel"] for r in first[:2]] == [f"telegram:c{PAGE + 4}", f"telegram:c{PAGE + 3}"]
    second, last = await data.conversations(Filters(before=after))
    assert [r["channel"] for r in second] == [f"telegram:c{i}" for i in range(4, -1, -1)]
    assert last is None and all(r["lines"] == 2 for r in first + second)
    mine, _ = await data.conversations(Filters(user="u1", state="waiting", platform="telegram"))
    assert len(mine) == len(range(1, PAGE + 5, 3))
    found, _ = await data.conversations(Filters(text="o 7% _x"))
    assert [r["channel"] for r in found] == ["telegram:c7"]
    # LIKE's wildcards in the text are literal (as wildcards, these would match "o 7% _x")
    assert (await data.conversations(Filters(text="o 7_ %x")))[0] == []
    replies, _ = await data.conversations(Filters(text="100% _done"))  # an assistant line
    assert len(replies) == PAGE
    assert (await data.conversations(Filters(state="finished")))[0] == []
    assert (await data.conversations(Filters(before="nonsense")))[0] == first  # ignored
    assert await data.platforms() == ["telegram"]


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_usage_and_health_figures(data: AdminData) -> None:
    usage = await data.usage(7, NOW)
    assert sum(r["prompt"] for r in usage["per_day"]) == 3 * (PAGE + 5)
    assert sum(r["completion"] for r in usage["per_day"]) == 2 * (PAGE + 5)
    assert [(r["model"], r["generations"]) for r in usage["per_model"]] == [("m1", PAGE + 5)]
    assert sorted(r["user_id"] for r in usage["per_user"]) == ["u0", "u1", "u2"]
    health = await data.health(2, NOW)
    assert sum(r["steps"] for r in health["per_slot"]) == PAGE + 5
    assert health["bucket"] == 60
    assert health["overall"]["p50"] == pytest.approx(0.1)
    assert health["active"] == {"waiting": PAGE + 5}
    assert health["inbox"] == 0 and health["errors"] == []
    conversation = await data.conversation((await data.conversations(Filters()))[0][0]["id"])
    assert conversation is not None
    assert [line.text for line in conversation.lines] == [
        f"hello {PAGE + 4}% _x_",
        "ok 100% _done_",
    ]
    assert conversation.lines[1].sent is True and conversation.lines[1].parts == 1
    assert [s["trigger"] for s in conversation.steps] == ["begin", "message"]
    assert await data.conversation("no-such-id") is None


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)
    assert percentile([2.0], 0.99) == 2.0


def test_plots_escape_labels_and_draw_what_they_are_given() -> None:
    hostile = '</text><script>alert(1)</script><text x="'
    svg = plots.bars("Per <user>", [(hostile, 5.0), ("b", 7.0)], unit="tokens")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "Per &lt;user&gt;" in svg
    assert svg.count('fill="#0072b2"') == 2  # one bar each
    line = plots.lines("t", [plots.Series(hostile, [(NOW, 1.0), (NOW + 60, 3.0)])])
    assert "<script>" not in line and "<polyline" in line
    assert "nothing here" in plots.lines("t", [], empty="nothing here")


def test_the_split_marks_follow_the_adapters_limits() -> None:
    from turbobot.adapters import discord, telegram

    assert SPLIT_AT == {"telegram": telegram.MESSAGE_LIMIT, "discord": discord.MESSAGE_LIMIT}


def test_the_admin_token_must_be_given_and_long() -> None:
    with pytest.raises(ConfigurationError, match="set TURBOBOT_ADMIN_TOKEN"):
        check_token("")
    with pytest.raises(ConfigurationError, match="too short"):
        check_token("short")
    assert check_token("x" * 16) == "x" * 16


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_hostile_text_and_parameters_never_break_a_page(store_url: str) -> None:
    """(Review: a lone surrogate in a message made its transcript fail for good; the
    text search matched the inbox JSON's keys; a NUL in a parameter failed on
    PostgreSQL; a non-ASCII cookie failed every page.)"""
    import httpx

    from turbobot.admin import create_app

    clock = FakeClock(NOW - 600)
    store = SQLStore(store_url, upgrade=True)
    await store.open()
    try:
        chat = BotSession(echo, llm=_model(clock), store=store, clock=clock)
        async with chat:
            await chat.say("broken \ud83d emoji", channel="odd", author="x" * 200)
            await store.flush()
    finally:
        await store.aclose()
    token = "t" * 20
    app = create_app(store_url, token, must_exist=False)
    auth = {"authorization": f"Bearer {token}"}
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a")
    async with client, contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(app.state.engine.dispose)  # (no lifespan through ASGI)
        listed = await client.get("/conversations", headers=auth)
        assert listed.status_code == 200
        (link,) = [part.split('"')[0] for part in listed.text.split('href="/conversations/')[1:]]
        page = await client.get(f"/conversations/{link}", headers=auth)
        assert page.status_code == 200 and "broken \ufffd emoji" in page.text
        for query in ("q=author_name", "q=is_bot", "q=message_id"):  # keys, not text
            found = await client.get(f"/conversations?{query}", headers=auth)
            assert found.status_code == 200 and 'id="none"' in found.text, query
        for path in (
            "/conversations?q=%00", "/conversations?user=%00", "/conversations?platform=%00",
            "/conversations?before=1:%00", "/conversations/%00", "/conversations?q=%ED%A0%BD",
            "/usage?days=%00", "/health?hours=%00",
        ):  # fmt: skip
            answer = await client.get(path, headers=auth)
            assert answer.status_code in (200, 404), (path, answer.status_code)
        for cookie in ("é", "1.x", "99999999999999999999999.abc", ""):
            header = f"turbobot_admin={cookie}".encode()
            refused = await client.get("/usage", headers={"cookie": header})
            assert refused.status_code == 401, cookie
        # a user id longer than the column is kept as its hash, and filters the same way
        from turbobot.sql.store import _usage_key

        mine = await client.get(
            "/conversations", params={"user": _usage_key("x" * 200, 128)}, headers=auth
        )
        assert f"/conversations/{link}" in mine.text


def test_the_upgrade_keys_long_user_ids_as_the_bot_does() -> None:
    import importlib

    from turbobot.sql.store import _usage_key

    revision = importlib.import_module("turbobot.migrations.versions.0005_operator_view")
    for user in ("7", "x" * 128, "y" * 129, "z" * 300, "nul\x00and \ud83d"):
        context = json.dumps({"author_id": user})
        assert revision._platform_and_user('["telegram", "1", null, null]', context) == (
            "telegram",
            _usage_key(user, 128),
        ), user


def test_an_inbox_payload_has_its_text_right_before_its_message_id() -> None:
    """What the text search relies on (queries._text_like)."""
    from turbobot.chat import ChannelKey, IncomingMessage
    from turbobot.codec import to_json

    payload = to_json(IncomingMessage(ChannelKey("t", "1"), 'say "hi"', "m1", "u").to_dict())
    assert '"text":"say \\"hi\\"","message_id":"m1"' in payload
