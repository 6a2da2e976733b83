"""The ``turbobot`` command. The only place that reads the environment and ``.env``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from turbobot import __version__
from turbobot.chat import ChannelKey
from turbobot.exceptions import ConfigurationError
from turbobot.llm.base import LLM
from turbobot.loader import load_template
from turbobot.runtime import Runtime, RuntimeSettings
from turbobot.store import BaseStore, InMemoryStore
from turbobot.template import Template

if TYPE_CHECKING:
    from turbobot.adapters.telegram import GroupMode, TelegramSettings

__all__ = ["build_llm", "choose_llm", "database_url", "main", "make_store", "parse_channel"]

_log = logging.getLogger(__name__)

PLATFORMS = ("console", "telegram", "discord")


def choose_llm(flag: str | None, env: Mapping[str, str]) -> str:
    """Which LLM backend to use: the flag, else ``TURBOBOT_LLM``, else by the key.

    ``auto`` (the default) means OpenAI-compatible when ``OPENAI_API_KEY`` or
    ``OPENAI_BASE_URL`` is set, else the offline local model.
    """
    choice = (flag or env.get("TURBOBOT_LLM") or "auto").strip().lower()
    if choice not in ("auto", "openai", "local"):
        raise ConfigurationError(f"unknown LLM backend {choice!r}; use auto, openai or local")
    if choice == "auto":
        return "openai" if env.get("OPENAI_API_KEY") or env.get("OPENAI_BASE_URL") else "local"
    return choice


def build_llm(choice: str, env: Mapping[str, str]) -> LLM:
    if choice == "openai":
        from turbobot.llm.openai import OpenAILLM

        base_url = env.get("OPENAI_BASE_URL") or None
        key = env.get("OPENAI_API_KEY") or None
        if key is None and base_url is None:
            raise ConfigurationError(
                "the openai backend needs OPENAI_API_KEY (and OPENAI_BASE_URL for a "
                "compatible server such as Ollama or llama.cpp)"
            )
        # Self-hosted compatible servers often need no key; the client insists on one.
        return OpenAILLM(api_key=key or "unused", base_url=base_url)
    from turbobot.llm.local import LocalLLM

    return LocalLLM(model_path=env.get("TURBOBOT_LOCAL_MODEL") or None)


DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///turbobot.db"


def database_url(flag: str | None, env: Mapping[str, str]) -> str:
    """The database to use: the flag, else ``TURBOBOT_DATABASE_URL``, else SQLite."""
    return flag or env.get("TURBOBOT_DATABASE_URL") or DEFAULT_DATABASE_URL


def make_store(url: str) -> BaseStore:
    """``memory`` for a store in RAM (nothing survives), else an SQLAlchemy async URL."""
    if url == "memory":
        return InMemoryStore()
    if "://" not in url:
        raise ConfigurationError(
            "TURBOBOT_DATABASE_URL must be an SQLAlchemy async URL such as "
            f"{DEFAULT_DATABASE_URL} or postgresql+asyncpg://user@host/db, or 'memory'"
        )
    from turbobot.sql import SQLStore

    return SQLStore(url)


def runtime_settings(env: Mapping[str, str]) -> RuntimeSettings:
    """Eviction settings from ``TURBOBOT_IDLE_EVICT_SECONDS`` and ``TURBOBOT_MAX_LIVE``."""
    try:
        idle = env.get("TURBOBOT_IDLE_EVICT_SECONDS")
        cap = env.get("TURBOBOT_MAX_LIVE")
        return RuntimeSettings(
            idle_evict_seconds=float(idle) if idle else 600.0,
            max_live=int(cap) if cap else None,
        )
    except ValueError as exc:
        raise ConfigurationError(
            f"TURBOBOT_IDLE_EVICT_SECONDS must be a number and TURBOBOT_MAX_LIVE an integer ({exc})"
        ) from exc


def parse_channel(text: str) -> ChannelKey:
    """``NAME`` (a console channel) or ``PLATFORM:CHANNEL[:THREAD]``."""
    parts = text.split(":")
    if len(parts) == 1:
        return ChannelKey("console", parts[0])
    if len(parts) in (2, 3) and all(parts):
        return ChannelKey(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
    raise ConfigurationError(f"channel {text!r} is not NAME or PLATFORM:CHANNEL[:THREAD]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbobot", description="Run LLM chat bots written as turbo templates."
    )
    parser.add_argument("--version", action="version", version=f"turbobot {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default)")
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database", help=f"SQLAlchemy async URL or 'memory' (default: {DEFAULT_DATABASE_URL})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a bot", parents=[database])
    run.add_argument("bot", help="bots.horoscope, path/to/bot.py, or module:attribute")
    run.add_argument("--platform", choices=PLATFORMS, default="console")
    run.add_argument("--channel", default="console", help="console channel name")
    run.add_argument("--model", help="model name (default: TURBOBOT_MODEL or the template's)")
    run.add_argument("--llm", choices=("auto", "openai", "local"), help="LLM backend")
    telegram = run.add_argument_group("telegram")
    telegram.add_argument(
        "--webhook-url", help="receive updates at this public URL (default: long polling)"
    )
    telegram.add_argument("--listen", default="0.0.0.0", help="webhook listen address")
    telegram.add_argument("--port", type=int, default=8443, help="webhook listen port")
    telegram.add_argument(
        "--group-mode",
        choices=("per-user", "shared"),
        help="groups: a conversation per member (default) or one shared by all",
    )
    db = sub.add_parser("db", help="manage the database schema", parents=[database])
    db.add_argument("action", choices=("upgrade", "current"))
    transcript = sub.add_parser(
        "transcript", help="print a channel's conversations", parents=[database]
    )
    transcript.add_argument("channel", help="NAME (console) or PLATFORM:CHANNEL[:THREAD]")
    sub.add_parser("conversations", help="list conversations and their state", parents=[database])
    return parser


def _template(args: argparse.Namespace, env: Mapping[str, str]) -> Template:
    template = load_template(args.bot)
    model = args.model or env.get("TURBOBOT_MODEL")
    return template.configure(model=model) if model else template


@contextlib.asynccontextmanager
async def _bot_parts(
    args: argparse.Namespace, env: Mapping[str, str]
) -> AsyncIterator[tuple[Template, BaseStore, LLM]]:
    """The template, the open store and the started LLM of a ``run``; closed after."""
    template = _template(args, env)
    store = make_store(database_url(args.database, env))
    llm = build_llm(choose_llm(args.llm, env), env)
    try:
        start = getattr(llm, "start", None)
        if start is not None:
            await start()  # load a local model before the first message, not during it
        async with store:
            yield template, store, llm
    finally:
        await llm.aclose()


async def _run_console(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    from turbobot.adapters.console import ConsoleAdapter

    adapter = ConsoleAdapter(channel=args.channel)
    async with _bot_parts(args, env) as (template, store, llm):
        settings = runtime_settings(env)
        async with Runtime(
            template, llm=llm, sender=adapter, store=store, settings=settings
        ) as runtime:
            await adapter.run(runtime)


def telegram_settings(args: argparse.Namespace, env: Mapping[str, str]) -> TelegramSettings:
    """Adapter settings from flags and ``TELEGRAM_*`` variables (flags win)."""
    from turbobot.adapters.telegram import TelegramSettings

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
        group_mode=cast("GroupMode", mode),
        trigger=env.get("TELEGRAM_TRIGGER") or None,
        rate=_number(env, "TELEGRAM_RATE", 30.0),
    )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name) or default)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigurationError(f"{name} must be a positive number, not {env.get(name)!r}")
    return value


async def _run_telegram(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    from turbobot.adapters.telegram import TelegramAdapter

    adapter = TelegramAdapter(telegram_settings(args, env))
    async with adapter, _bot_parts(args, env) as (template, store, llm):
        settings = dataclasses.replace(runtime_settings(env), bot_username=adapter.username)
        async with Runtime(
            template, llm=llm, sender=adapter, store=store, settings=settings
        ) as runtime:
            print(f"turbobot: @{adapter.username} is running; Ctrl-C stops it", file=sys.stderr)
            await adapter.run(runtime)


async def _db(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from turbobot.sql.migrate import current_revision, head_revision, upgrade_schema

    url = database_url(args.database, env)
    if url == "memory":
        raise ConfigurationError("the in-memory store has no schema to manage")
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            if args.action == "upgrade":
                await conn.run_sync(upgrade_schema)
            revision = await conn.run_sync(current_revision)
    finally:
        await engine.dispose()
    head = head_revision()
    state = "up to date" if revision == head else f"needs upgrade to {head}"
    print(f"{revision or 'empty'} ({state})")


async def _transcript(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    key = parse_channel(args.channel)
    async with make_store(database_url(args.database, env)) as store:
        lines = await store.transcript(key)
        records = {r.id: r for r in await store.conversations(key)}
    if not lines:
        print(f"no messages in {key}", file=sys.stderr)
        return
    current = None
    for line in lines:
        if line.conversation_id != current:
            current = line.conversation_id
            record = records.get(current)
            status = record.status if record else "?"
            print(f"--- conversation {current} ({status})")
        print(f"{line.role}: {line.text}")


async def _conversations(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    async with make_store(database_url(args.database, env)) as store:
        records = await store.conversations()
    if not records:
        print("no conversations", file=sys.stderr)
    for record in records:
        state: str = record.status
        if record.status == "waiting" and record.deadline is not None:
            state += f" (times out {_when(record.deadline)})"
        if record.broken:
            state += " (generation to retry)"
        started = _when(record.started_at)
        print(f"{record.key}\t{record.id}\t{started}\t{state}")


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from dotenv import load_dotenv

        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        pass
    env = dict(os.environ)
    level = (args.log_level or env.get("TURBOBOT_LOG_LEVEL") or "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            if args.platform == "console":
                asyncio.run(_run_console(args, env))
            elif args.platform == "telegram":
                asyncio.run(_run_telegram(args, env))
            else:
                raise ConfigurationError(
                    f"the {args.platform} adapter is not part of this version yet; "
                    "use --platform console or telegram"
                )
        elif args.command == "db":
            asyncio.run(_db(args, env))
        elif args.command == "transcript":
            asyncio.run(_transcript(args, env))
        elif args.command == "conversations":
            asyncio.run(_conversations(args, env))
    except ConfigurationError as exc:
        print(f"turbobot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
