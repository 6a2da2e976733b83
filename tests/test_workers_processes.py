"""Several ``turbobot run`` processes on one PostgreSQL database (the scale-out suite).

Each worker is a real process of the CLI on the fake Bot API. Lease expiry after a
kill is made to happen on the database's clock (``expires_at`` set in the past), as
the lease's time would, without waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fakes.openai_server import FakeOpenAI, Reply
from fakes.round_robin import RoundRobinProxy
from fakes.telegram_server import FakeTelegram
from tests.test_console import spawn_turbobot
from tests.test_crash import bot_env, model_server, upgrade_schema
from tests.test_workers import sql

from .conftest import _create_database

pytestmark = pytest.mark.slow

CHATS = int(os.environ.get("WORKERS_CHATS", "40"))
ROUNDS = 6
FIRST_CHAT = 9000
SECRET = "workers-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def turbobot_run(env: dict[str, str], log: Path, *args: str) -> AsyncIterator[Any]:
    """``turbobot --log-level INFO run ARGS`` logging to ``log``, stopped at the end
    (SIGCONT, SIGTERM) if still running."""
    with log.open("ab") as out:
        proc = await spawn_turbobot(
            env,
            "--log-level",
            "INFO",
            "run",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)  # (a test may leave it stopped)
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def worker(
    env: dict[str, str], name: str, port: int, log: Path, bot: str = "tests.workers_bot:tally"
) -> contextlib.AbstractAsyncContextManager[Any]:
    """One Telegram webhook worker on ``port``."""
    return turbobot_run(
        {**env, "TURBOBOT_WORKER_NAME": name},
        log,
        bot,
        "--platform",
        "telegram",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
    )


async def deliver(telegram: FakeTelegram, chat: int, text: str) -> int:
    """Deliver one message as Telegram does: again until the webhook answers 200."""
    update = telegram.message(chat, text, push=False)
    for attempt in range(200):
        if await telegram.deliver(update) == 200:
            return attempt
        await asyncio.sleep(0.05)  # Telegram's pause before it delivers again
    raise AssertionError(f"chat {chat}: {text!r} was never accepted")


def deduplicated(texts: list[str]) -> list[str]:
    return [t for i, t in enumerate(texts) if i == 0 or texts[i - 1] != t]


async def test_telegram_webhook_on_two_workers_behind_a_proxy_one_killed(
    postgres: Any, tmp_path: Path
) -> None:
    """Two workers (as on two machines) behind a round-robin proxy; the same chat's
    updates land on either. Half way, one is SIGKILLed: the other takes its channels
    over. Every message is answered once, in order (a reply the killed worker had
    sent but not yet marked sent may show twice: Telegram has no idempotency key)."""
    url = await _create_database(postgres)
    chats = range(FIRST_CHAT, FIRST_CHAT + CHATS)
    ports = [free_port(), free_port()]
    upstreams = [f"http://127.0.0.1:{p}" for p in ports]
    async with (
        model_server() as llm,
        FakeTelegram() as telegram,
        RoundRobinProxy(upstreams) as proxy,
    ):
        env = bot_env(
            telegram,
            llm,
            url,
            TELEGRAM_WEBHOOK_URL=f"{proxy.url}/telegram/hook",
            TELEGRAM_WEBHOOK_SECRET=SECRET,
            TURBOBOT_LEASE_SECONDS="3",
        )
        await upgrade_schema(env)
        async with contextlib.AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(worker(env, f"w{i}", port, tmp_path / f"w{i}.log"))
                for i, port in enumerate(ports)
            ]
            await telegram.wait_until(
                lambda: sum(c.method == "setWebhook" for c in telegram.calls) >= 2,
                timeout=60,
            )
            for n in range(1, ROUNDS + 1):
                if n == ROUNDS // 2:
                    held = await sql(
                        url,
                        "SELECT count(*) AS n FROM leases "
                        "WHERE worker = 'w0' AND expires_at > now()",
                    )
                    procs[0].send_signal(signal.SIGKILL)
                    await procs[0].wait()
                    # its leases run out (as they would after TURBOBOT_LEASE_SECONDS)
                    await sql(
                        url,
                        "UPDATE leases SET expires_at = now() - interval '1 second' "
                        "WHERE worker = 'w0'",
                    )
                await asyncio.gather(*(deliver(telegram, chat, f"m{n}") for chat in chats))
            await telegram.wait_until(
                lambda: all(len(deduplicated(telegram.texts(chat))) >= ROUNDS for chat in chats),
                timeout=120,
            )
            assert procs[1].returncode is None
        status = await sql(url, "SELECT count(*) AS n FROM inbox WHERE NOT consumed")
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    expected = [f"{n}:m{n}" for n in range(1, ROUNDS + 1)]
    shown_twice = 0
    for chat in chats:
        texts = telegram.texts(chat)
        assert deduplicated(texts) == expected, (chat, texts, logs[-4000:])
        shown_twice += len(texts) - len(expected)
    assert status[0]["n"] == 0  # every input used
    assert held[0]["n"] > 0  # the killed worker held channels, which were taken over
    # Only what the kill cut off: the last reply the killed worker had sent, whose
    # "sent" mark was still waiting for the conversation's next commit, once more, in
    # chats it held (a round's webhook call is answered once the message is stored,
    # so that reply is of round 1 or 2: rounds 1 and 2 came before the kill).
    before_kill = {f"{n}:m{n}" for n in range(1, ROUNDS // 2)}
    twice = {chat: telegram.texts(chat) for chat in chats if len(telegram.texts(chat)) > ROUNDS}
    for texts in twice.values():
        again = [t for i, t in enumerate(texts) if i and texts[i - 1] == t]
        assert len(again) == 1 and again[0] in before_kill, twice
    assert len(twice) <= held[0]["n"], twice
    assert all(proxy.answered), proxy.answered  # both workers took updates
    print(
        f"held by the killed worker: {held[0]['n']}; shown twice: {shown_twice}; "
        f"answered per worker: {proxy.answered}, refused: {proxy.failed}"
    )
    assert "Traceback" not in logs.replace("KeyboardInterrupt", ""), logs[-4000:]


WORKERS_CHATS = int(os.environ.get("WORKERS_MANY_CHATS", "150"))
WORKERS_MESSAGES = int(os.environ.get("WORKERS_MESSAGES", "20"))


async def test_three_workers_from_one_command_share_the_chats(
    postgres: Any, tmp_path: Path
) -> None:
    """``turbobot run --workers 3``: three processes on one webhook port (the kernel
    spreads the connections), ``WORKERS_MANY_CHATS`` chats of ``WORKERS_MESSAGES``
    messages each (full size: 1,000 and 20, ``make workers``). Every chat's replies in
    order, each message answered once; ``turbobot status`` shows the three workers."""
    url = await _create_database(postgres)
    chats = range(FIRST_CHAT, FIRST_CHAT + WORKERS_CHATS)
    port = free_port()
    log = tmp_path / "workers.log"
    async with model_server() as llm, FakeTelegram() as telegram:
        env = bot_env(
            telegram,
            llm,
            url,
            TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{port}/telegram/hook",
            TELEGRAM_WEBHOOK_SECRET=SECRET,
            TURBOBOT_WORKER_NAME="box",
        )
        await upgrade_schema(env)
        async with turbobot_run(
            env,
            log,
            "tests.workers_bot:tally",
            "--platform",
            "telegram",
            "--workers",
            "3",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
        ) as supervisor:
            await telegram.wait_until(
                lambda: sum(c.method == "setWebhook" for c in telegram.calls) >= 3, timeout=60
            )
            for n in range(1, WORKERS_MESSAGES + 1):
                await asyncio.gather(*(deliver(telegram, chat, f"m{n}") for chat in chats))
            await telegram.wait_until(
                lambda: all(len(telegram.texts(chat)) >= WORKERS_MESSAGES for chat in chats),
                timeout=300,
            )
            status = await spawn_turbobot(env, "status", stdin=asyncio.subprocess.DEVNULL)
            shown, err = await status.communicate()
            assert status.returncode == 0, err
            held = await sql(
                url,
                "SELECT worker, count(*) AS n FROM leases WHERE expires_at > now() "
                "GROUP BY worker ORDER BY worker",
            )
            supervisor.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(supervisor.wait(), 90)
    output = shown.decode()
    assert output.startswith("3 worker(s)"), output
    for name in ("box-0", "box-1", "box-2"):
        assert name in output, output
    assert "inbox: 0 message(s)" in output, output
    assert [row["worker"] for row in held] == ["box-0", "box-1", "box-2"], held  # all took chats
    expected = [f"{n}:m{n}" for n in range(1, WORKERS_MESSAGES + 1)]
    for chat in chats:
        assert telegram.texts(chat) == expected, (chat, telegram.texts(chat))
    assert code == 0, log.read_text()[-3000:]
    leftover = await sql(url, "SELECT count(*) AS n FROM workers")
    assert leftover[0]["n"] == 0  # each worker left the registry on its way out


def slow_echo(body: dict[str, Any]) -> Reply:
    """Echoes; a message starting with "slow" is answered after 2 s (a worker is
    stopped during that answer)."""
    said = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    return Reply(content=f"echo: {said}", delay=2.0 if said.startswith("slow") else 0.0)


async def until(predicate: Any, seconds: float, what: str) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_worker_stopped_past_its_lease_cannot_commit_when_resumed(
    postgres: Any, tmp_path: Path
) -> None:
    """SIGSTOP a worker in the middle of a step (its model call), past its lease; the
    other worker takes the chat and answers; SIGCONT: the first one's step is refused
    by the fence, and it sends nothing."""
    url = await _create_database(postgres)
    chat = FIRST_CHAT
    ports = [free_port(), free_port()]
    llm = FakeOpenAI(slow_echo)
    await llm.start()
    try:
        async with FakeTelegram() as telegram:
            env = bot_env(
                telegram,
                llm,
                url,
                TELEGRAM_WEBHOOK_URL=f"http://127.0.0.1:{ports[0]}/telegram/hook",
                TELEGRAM_WEBHOOK_SECRET=SECRET,
                TURBOBOT_LEASE_SECONDS="3",
            )
            await upgrade_schema(env)
            logs = [tmp_path / "w0.log", tmp_path / "w1.log"]
            async with contextlib.AsyncExitStack() as stack:
                procs = [
                    await stack.enter_async_context(
                        worker(env, f"w{i}", port, logs[i], "tests.workers_bot:asks")
                    )
                    for i, port in enumerate(ports)
                ]
                await telegram.wait_until(
                    lambda: sum(c.method == "setWebhook" for c in telegram.calls) >= 2,
                    timeout=60,
                )
                assert telegram.webhook is not None

                async def send_to(index: int, text: str) -> None:
                    assert telegram.webhook is not None
                    telegram.webhook.url = f"http://127.0.0.1:{ports[index]}/telegram/hook"
                    await deliver(telegram, chat, text)

                await send_to(0, "hi")
                await telegram.wait_until(lambda: len(telegram.texts(chat)) == 1, timeout=30)
                rows = await sql(url, "SELECT worker FROM leases WHERE expires_at > now()")
                holder = int(rows[0]["worker"][1:])  # either may have taken the chat
                other = 1 - holder
                asked = len(llm.requests)
                await send_to(holder, "slow one")
                await until(lambda: len(llm.requests) > asked, 30, "the model call")
                procs[holder].send_signal(signal.SIGSTOP)
                # its lease runs out (as it would after TURBOBOT_LEASE_SECONDS)
                await sql(
                    url,
                    "UPDATE leases SET expires_at = now() - interval '1 second' "
                    f"WHERE worker = 'w{holder}'",
                )
                await send_to(other, "next")
                await telegram.wait_until(lambda: len(telegram.texts(chat)) == 3, timeout=60)
                procs[holder].send_signal(signal.SIGCONT)
                await until(
                    lambda: "another worker took" in logs[holder].read_text(),
                    30,
                    "the resumed worker to find its step refused",
                )
                await send_to(other, "last")
                await telegram.wait_until(lambda: len(telegram.texts(chat)) == 4, timeout=60)
    finally:
        await llm.stop()
    said = [m["content"] for r in llm.requests for m in r["messages"] if m["role"] == "user"]
    assert telegram.texts(chat) == ["echo: hi", "echo: slow one", "echo: next", "echo: last"]
    # asked twice: by the stopped worker (refused) and by the one that took over
    assert [r["messages"][-1]["content"] for r in llm.requests].count("slow one") == 2, said
