"""turbobot end to end on the anchors' two-step workload, from the same platform payloads.

usage: python bench/bench_e2e.py CHATS telegram|telegram-ptb|discord [memory|sqlite]

Where ``bench/bench_turbobot.py`` hands ``IncomingMessage`` objects to the runtime, this
starts from what the platform sends, exactly as the anchors do (``bench/anchors``):

telegram       the anchors' update dicts (``make_update``), a getUpdates page of 100 at a
               time, through the real ``TelegramAdapter``: its raw-update reader, the
               runtime, and its replies through python-telegram-bot's ``send_message``
               (the HTTP transport is a local ``BaseRequest``, as in the PTB anchor, so
               PTB still builds each request and parses Telegram's answer).
telegram-ptb   the same, but each page parsed by PTB first (``Update.de_list``, what
               ``bot.get_updates`` does) and converted by ``to_incoming``: the adapter's
               path before it read raw updates.
discord        the anchors' MESSAGE_CREATE payloads fed to discord.py's
               ``parse_message_create`` (what the gateway handler calls) with the real
               ``DiscordAdapter`` listening; replies through its ``send`` and discord.py's
               HTTP client, whose ``request`` is a local stub (as in the discord.py anchor).

Store: ``sqlite`` (default; WAL, synchronous=FULL) or ``memory``. Prints one JSON line
in the anchors' format (``benchlib.emit``).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "anchors"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


import benchlib as B
from bench_turbobot import make_store, take_database, twostep

from turbobot.llm.scripted import ScriptedLLM
from turbobot.runtime import Runtime, RuntimeSettings


def _anchor(name: str) -> Any:
    """An anchor script of bench/anchors as a module (bench/ has a bench_discord.py too)."""
    path = Path(__file__).resolve().parent / "anchors" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"anchor_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The anchors' own payload builders and in-process transports: both sides are fed the
# very same dicts and answered by the very same stubs (which record the replies).
_ptb_anchor = _anchor("bench_ptb")
_discord_anchor = _anchor("bench_discord")
make_update, make_payload = _ptb_anchor.make_update, _discord_anchor.make_payload

BOT_ID = 123456789
TOKEN = f"{BOT_ID}:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
PAGE = 100


# -- Telegram -----------------------------------------------------------------------


async def run_telegram(runtime: Runtime, adapter: Any, variant: str, phases: Any) -> None:
    from telegram import Update

    async def feed(updates: Iterable[dict[str, Any]]) -> None:
        page: list[dict[str, Any]] = []
        for update in updates:
            page.append(update)
            if len(page) == PAGE:
                await receive(page)
                page = []
        if page:
            await receive(page)
        await runtime.join()

    async def receive(page: list[dict[str, Any]]) -> None:
        if variant == "telegram-ptb":
            await adapter._receive_all(runtime, Update.de_list(page, adapter.bot))
        else:
            await adapter._receive_raw(runtime, page)

    await phases(
        lambda ids: feed(make_update(i, 10**9 + i, "hi") for i in ids),
        lambda ids: feed(make_update(i, 2 * 10**9 + i, B.name_for(i)) for i in ids),
    )


async def telegram_main(chats: int, variant: str, store_kind: str) -> None:
    from turbobot.adapters.telegram import TelegramAdapter, TelegramSettings

    settings = TelegramSettings(TOKEN, rate=1e9)
    requests = (_ptb_anchor.LocalRequest(), _ptb_anchor.LocalRequest())
    async with TelegramAdapter(settings, requests=requests) as adapter:
        await _run(chats, variant, store_kind, adapter, run_telegram, _ptb_anchor.LOG)


# -- Discord ------------------------------------------------------------------------


async def discord_main(chats: int, variant: str, store_kind: str) -> None:
    import discord

    from turbobot.adapters.discord import DiscordAdapter, DiscordSettings

    adapter = DiscordAdapter(DiscordSettings(TOKEN))
    stub, log = _discord_anchor.Bench(), _discord_anchor.LOG
    client = adapter.client
    async with client:  # binds the loop; no login, no gateway (as the anchor)
        client.http.request = stub.fake_request  # type: ignore[method-assign]
        state = client._connection
        state.user = discord.ClientUser(state=state, data=_discord_anchor.BOT_USER)  # READY's
        adapter.bot_id, adapter.username = BOT_ID, "bench_bot"

        async def run(runtime: Runtime, adapter: Any, variant: str, phases: Any) -> None:
            consumer = asyncio.create_task(adapter._consume(runtime))

            async def feed(payloads: Iterable[dict[str, Any]], count: int) -> None:
                expected = len(log.sent) + count  # (the previous phase is all answered)
                for payload in payloads:
                    state.parse_message_create(payload)
                await stub.wait_replies(expected)
                await runtime.join()

            await phases(
                lambda ids: feed((make_payload(i, 4 * 10**17 + i, "hi") for i in ids), len(ids)),
                lambda ids: feed(
                    (make_payload(i, 5 * 10**17 + i, B.name_for(i)) for i in ids), len(ids)
                ),
            )
            adapter._queue.put_nowait(None)
            await consumer

        await _run(chats, variant, store_kind, adapter, run, log)


# -- the measured run (the same shape as the anchors') --------------------------------


async def _run(
    chats: int, variant: str, store_kind: str, adapter: Any, drive: Any, log: B.ReplyLog
) -> None:
    """The anchors' measured run; ``log`` is the anchor stub's record of the replies."""
    store, path = make_store(store_kind)
    await store.open()
    settings = RuntimeSettings(idle_evict_seconds=None, gc_threshold=10_000)
    runtime = Runtime(twostep, llm=ScriptedLLM(), sender=adapter, store=store, settings=settings)
    await runtime.start()
    result: dict[str, Any] = {}

    async def phases(first: Any, second: Any) -> None:
        await first(B.WARMUP_IDS)
        await second(B.WARMUP_IDS)
        assert len(log.sent) == 2 * B.WARMUP, len(log.sent)
        log.reset()
        gc.collect()
        result["rss_base"] = B.rss_mb()
        t = B.Timer()
        t.start()
        await first(range(chats))
        t.mark("phase1")
        result["rss_waiting"] = B.rss_mb()
        result["waiting"] = runtime.live_count
        await second(range(chats))
        await store.flush()
        t.mark("end")
        result["timer"] = t

    await drive(runtime, adapter, variant, phases)
    await runtime.aclose()
    await store.aclose()
    t = result["timer"]
    extra: dict[str, object] = {"waiting_seen": result["waiting"], "store": store_kind}
    if path:
        extra["db_bytes"] = take_database(path)
    B.emit(
        "turbobot",
        f"{variant} {store_kind}",
        chats,
        t.marks["end"],
        log.verify(chats) and result["waiting"] == chats,
        result["rss_base"],
        result["rss_waiting"],
        t.cpu_marks["end"],
        **extra,
    )


if __name__ == "__main__":
    chats = B.parse_chats()
    kind = sys.argv[2] if len(sys.argv) > 2 else "telegram"
    store_kind = sys.argv[3] if len(sys.argv) > 3 else "sqlite"
    if kind in ("telegram", "telegram-ptb"):
        asyncio.run(telegram_main(chats, kind, store_kind))
    elif kind == "discord":
        asyncio.run(discord_main(chats, kind, store_kind))
    else:
        sys.exit(f"unknown variant {kind}: telegram, telegram-ptb or discord")
