"""``turbobot run --workers N``: N worker processes on this machine, one database.

Each worker is the same ``turbobot run`` command in a process of its own, named
``NAME-i`` (``TURBOBOT_WORKER_NAME``, else the machine's name): the workers share
the PostgreSQL database and split the channels between them with leases
(docs/architecture.md, "Scale-out"). How updates reach them:

- Telegram, by webhook: every worker listens on the same port (``SO_REUSEPORT``: the
  kernel spreads the connections); long polling serves one process only, so it is
  refused.
- Discord: the bot's shards are dealt out, shard ``s`` to worker ``s mod N``
  (``--shard-count``, default N).

The supervisor starts a worker again when it dies (after a pause that grows while it
keeps dying) and stops them all on SIGTERM or Ctrl-C. Workers on several machines
need no supervisor: run the same command on each, with the same database URL.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from turbobot.exceptions import ConfigurationError

__all__ = ["plan", "supervise"]

_log = logging.getLogger(__name__)

#: more would not fit a machine's cores anyway; a typo (--workers 1000) is refused
MAX_WORKERS = 64
#: a worker alive this long before it died is started again at once
_HEALTHY_SECONDS = 30.0


@dataclass
class _Child:
    index: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    pause: float = 0.0
    due: float = 0.0
    restarts: int = field(default=0)


def plan(args: argparse.Namespace, env: Mapping[str, str]) -> list[dict[str, str]]:
    """Each worker's environment (what differs from this process's): checked first, so a
    configuration that cannot work fails here, once, not in every worker."""
    from turbobot.cli import (
        ADMIN_PORT_VARIABLE,
        WORKER_INDEX_VARIABLE,
        WORKER_NAME_VARIABLE,
        _database,
        check_database_url,
    )
    from turbobot.sql.leases import default_worker_name

    count = args.workers
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigurationError(f"--workers must be from 1 to {MAX_WORKERS}, not {count}")
    database = _database(args.database, env)
    parsed = check_database_url(database.url, database.source)
    if parsed is None or parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            "--workers needs a PostgreSQL database the workers share (a SQLite file belongs "
            "to one process): set TURBOBOT_DATABASE_URL to postgresql+asyncpg://..."
        )
    base = env.get(WORKER_NAME_VARIABLE, "").strip() or default_worker_name()
    if args.admin_port is not None or env.get(ADMIN_PORT_VARIABLE):
        raise ConfigurationError(
            "--workers runs several processes, and one admin page reads them all: run "
            "`turbobot admin` beside them instead of --admin-port"
        )
    plans = [
        {WORKER_NAME_VARIABLE: f"{base}-{i}", WORKER_INDEX_VARIABLE: str(i)} for i in range(count)
    ]
    platform = args.platform
    if platform == "console":
        raise ConfigurationError("the console is one terminal: run it without --workers")
    if platform == "telegram":
        if not (args.webhook_url or env.get("TELEGRAM_WEBHOOK_URL")):
            raise ConfigurationError(
                "--workers with Telegram needs a webhook (--webhook-url or "
                "TELEGRAM_WEBHOOK_URL): Telegram serves long polling to one process only"
            )
    elif platform == "discord":
        if args.shard_ids or env.get("DISCORD_SHARD_IDS"):
            raise ConfigurationError(
                "--workers deals the shards out itself: give --shard-count (or "
                "DISCORD_SHARD_COUNT) without --shard-ids"
            )
        shards = args.shard_count or int(env.get("DISCORD_SHARD_COUNT") or count)
        if shards < count:
            raise ConfigurationError(
                f"--workers {count} needs at least as many shards; --shard-count is {shards}"
            )
        for i, worker in enumerate(plans):
            worker["DISCORD_SHARD_COUNT"] = str(shards)
            worker["DISCORD_SHARD_IDS"] = ",".join(str(s) for s in range(i, shards, count))
    return plans


def supervise(args: argparse.Namespace, env: Mapping[str, str], argv: Sequence[str]) -> int:
    """Run the workers until SIGTERM or Ctrl-C; the exit status of the command."""
    plans = plan(args, env)
    command = [sys.executable, "-m", "turbobot", *argv, "--workers", "1"]
    children = [_Child(i, {**env, **extra}) for i, extra in enumerate(plans)]
    stopping: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            _start(child, command)
        status = _watch(children, command, stopping)
    finally:
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in children:
            if child.process is not None:
                _wait(child.process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status:
        return status
    return 130 if stopping and stopping[0] == signal.SIGINT else 0


def _watch(children: list[_Child], command: list[str], stopping: list[int]) -> int:
    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for child in children:
            process = child.process
            if process is None:
                if now >= child.due:
                    _start(child, command)
                continue
            code = process.poll()
            if code is None:
                continue
            child.process = None
            if code == 2 and child.restarts == 1:
                # a configuration error at its first start: starting again would not help
                # (later, 2 may be a database or platform out of reach for a while)
                print(
                    f"turbobot: worker {child.index} stopped on a configuration error; "
                    "stopping the others",
                    file=sys.stderr,
                )
                return 2
            healthy = now - child.started >= _HEALTHY_SECONDS
            child.pause = 0.0 if healthy else min(30.0, max(1.0, child.pause * 2))
            child.due = now + child.pause
            print(
                f"turbobot: worker {child.index} exited ({code}); starting it again"
                + (f" in {child.pause:.0f}s" if child.pause else ""),
                file=sys.stderr,
            )
    return 0


def _start(child: _Child, command: list[str]) -> None:
    child.process = subprocess.Popen(
        command, env=child.env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
    )
    child.started = time.monotonic()
    child.restarts += 1


def _die_with_parent() -> None:
    """In the worker, before it runs: SIGTERM it if the supervisor dies (even by
    SIGKILL), so that no orphaned worker keeps running beside the next supervisor's
    worker of the same name."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # not Linux: the operator stops the workers
        pass


def _wait(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
