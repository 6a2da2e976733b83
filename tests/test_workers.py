"""Several workers on one PostgreSQL database, in one process (turbobot.sql.leases).

Each worker is a runtime with a store of its own (its own connections, its own
lease holder) on the same database: what separate processes do, without their
start-up cost. Lease expiry is made to happen by setting ``expires_at`` in the past
(the database's clock), never by waiting for it. The multi-process suite with real
SIGKILL and SIGSTOP is tests/test_workers_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from turbobot import GetUserInput, Result, turbo
from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.llm.base import DeltaCallback, LLMRequest, LLMResponse
from turbobot.runtime import Runtime, RuntimeSettings
from turbobot.sql import SQLStore
from turbobot.testing import RecordingSender

from .conftest import _create_database
from .workers_bot import asks, tally


class GatedLLM:
    """Answers "echo: TEXT"; a text starting with "slow" waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.asked: list[str] = []
        self.started = asyncio.Event()

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse:
        text = str(request.messages[-1]["content"])
        self.asked.append(text)
        if text.startswith("slow"):
            self.started.set()
            await self.gate.wait()
        return LLMResponse(f"echo: {text}", (), None, "stop")

    async def aclose(self) -> None:
        return None


@dataclass
class Worker:
    name: str
    store: SQLStore
    runtime: Runtime

    @property
    def leases(self) -> Any:
        assert self.store.leases is not None
        return self.store.leases


@pytest.fixture
async def database(postgres: Any) -> str:
    url = await _create_database(postgres)
    async with SQLStore(url, upgrade=True):  # the schema, once
        pass
    return url


@contextlib.asynccontextmanager
async def workers(
    url: str,
    count: int,
    template: Any = tally,
    *,
    llm: Any = None,
    sender: Any = None,
    settings: RuntimeSettings | None = None,
    prefix: str = "w",
    clock: Any = None,
) -> AsyncIterator[list[Worker]]:
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for i in range(count):
            # a long lease: nothing expires unless a test says so
            store = SQLStore(url, worker=f"{prefix}{i}", lease_seconds=600)
            await stack.enter_async_context(store)
            runtime = Runtime(
                template,
                llm=llm or GatedLLM(),
                sender=sender or RecordingSender(),
                store=store,
                settings=settings,
                clock=clock,
            )
            await stack.enter_async_context(runtime)
            started.append(Worker(f"{prefix}{i}", store, runtime))
        yield started


async def settle(crew: list[Worker], done: Callable[[], bool], rounds: int = 500) -> None:
    """Until ``done()``: let every worker handle what it has (notifications travel
    through PostgreSQL, so a worker may get work after its join returned)."""
    for _ in range(rounds):
        await asyncio.gather(*(w.runtime.join() for w in crew))
        if done():
            return
        await asyncio.sleep(0.01)  # a notification on its way
    state = {
        w.name: {
            "held": w.leases.held(),
            "refused": sorted(w.leases._refused),
            "queued": {str(k): len(q) for k, q in w.runtime._queues.items()},
            "reload": list(w.runtime._reload),
            "busy": [str(k) for k, _ in w.runtime._workers.tasks()],
        }
        for w in crew
    }
    raise AssertionError(f"the workers did not finish their work: {state}")


async def sql(url: str, statement: str, *args: Any) -> Any:
    """The rows of ``statement`` run on the database at ``url`` (asyncpg, directly)."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def expire(url: str, worker: str) -> None:
    """The worker's leases run out now (on the database's clock, as time would)."""
    await sql(
        url,
        "UPDATE leases SET expires_at = now() - interval '1 second' WHERE worker = $1",
        worker,
    )


def holder_first(crew: list[Worker], key: ChannelKey) -> list[Worker]:
    """The worker holding ``key``, then the other (either may have taken it: the one
    that did not receive its message, on its first look at the leases)."""
    return crew if crew[0].leases.holds(key) else crew[::-1]


def message(channel: int, n: int) -> IncomingMessage:
    return IncomingMessage(ChannelKey("test", str(channel)), f"m{n}", f"{channel}-{n}", "u")


async def test_messages_landing_on_any_worker_are_answered_in_order_once(database: str) -> None:
    sender = RecordingSender()
    channels, per_channel = 30, 6
    async with workers(database, 3, sender=sender) as crew:
        for n in range(1, per_channel + 1):
            for c in range(channels):
                await crew[(c + n) % 3].runtime.receive(message(c, n))
        await settle(crew, lambda: len(sender.sent) == channels * per_channel)
        holders = {w.name: len(w.leases.held()) for w in crew}
    for c in range(channels):
        assert sender.texts(ChannelKey("test", str(c))) == [
            f"{n}:m{n}" for n in range(1, per_channel + 1)
        ]
    assert sum(holders.values()) == channels  # each channel held by one worker
    assert len(sender.sent) == channels * per_channel


async def test_a_channel_moves_between_workers_and_its_conversation_goes_on(
    database: str,
) -> None:
    """Conversations evicted after each message (as idle ones are): each worker gives
    the channel up, and the next message's worker rebuilds it by replay."""
    sender = RecordingSender()
    key = ChannelKey("test", "7")
    async with workers(database, 3, sender=sender) as crew:
        for n in range(1, 10):
            await crew[n % 3].runtime.receive(message(7, n))
            await settle(crew, lambda n=n: len(sender.sent) == n)
            for w in crew:
                await w.runtime.evict(key)
                await w.runtime.check_leases()  # idle: released
            assert not any(w.leases.holds(key) for w in crew)
    assert sender.texts(key) == [f"{n}:m{n}" for n in range(1, 10)]


async def test_a_worker_past_its_lease_cannot_commit_its_step(database: str) -> None:
    """A worker paused mid-step (here: waiting for the model) past its lease; another
    takes the channel and answers; the first one's step is refused by the fence."""
    llm = GatedLLM()
    sender = RecordingSender()
    key = ChannelKey("test", "1")
    async with workers(database, 2, asks, llm=llm, sender=sender) as crew:
        await crew[0].runtime.receive(message(1, 1))
        await settle(crew, lambda: len(sender.sent) == 1)
        first, second = holder_first(crew, key)
        slow = IncomingMessage(key, "slow one", "1-2", "u")
        await first.runtime.receive(slow)
        await llm.started.wait()  # the first worker is in its step
        await expire(database, first.name)
        # the next message lands on the second worker, which takes the channel (on
        # its next look at the leases: it had found the channel held a moment ago)
        await second.runtime.receive(message(1, 3))
        await second.runtime.check_leases()
        llm.gate.set()
        await settle(crew, lambda: len(sender.sent) >= 3 and not first.leases.holds(key))
        assert second.leases.holds(key)
    # the slow message answered once (by the second worker), then the next one
    assert sender.texts(key) == ["echo: m1", "echo: slow one", "echo: m3"]
    assert llm.asked.count("slow one") == 2  # the first worker's answer was never committed


@turbo()
async def patient():
    """Waits a minute for each answer."""
    while True:
        said = yield GetUserInput(timeout=60)
        yield Result("still there?" if said.timed_out else f"got {said}")


async def test_a_deadline_fires_once_across_workers_even_after_a_takeover(database: str) -> None:
    """Only the channel's holder arms its deadline; when the holder is past its lease,
    the worker that takes the channel fires it, and the old holder's own timer fires
    into a step the fence refuses: the user is asked once."""
    from turbobot.clock import FakeClock

    clock = FakeClock()  # (shared: both workers' time moves together)
    sender = RecordingSender()
    key = ChannelKey("test", "5")
    async with workers(database, 2, patient, sender=sender, clock=clock) as crew:
        await crew[0].runtime.receive(message(5, 1))
        await settle(crew, lambda: len(sender.sent) == 1)
        first, second = holder_first(crew, key)
        clock.advance(61)
        await settle(crew, lambda: len(sender.sent) == 2)
        assert sender.texts(key) == ["got m1", "still there?"]  # fired once, by the holder
        await expire(database, first.name)
        await second.runtime.check_leases()  # its deadline is due within a lease: taken
        await settle(crew, lambda: second.leases.holds(key))
        clock.advance(61)  # both workers' timers are due now
        await settle(
            crew, lambda: len(sender.sent) == 3 and not first.leases.holds(key), rounds=300
        )
        await asyncio.gather(*(w.runtime.join() for w in crew))
    assert sender.texts(key) == ["got m1", "still there?", "still there?"]


class DownSender(RecordingSender):
    """A platform that refuses everything (the worker behind it is cut off) until
    ``up``."""

    up = False

    async def send(self, key: ChannelKey, text: str) -> str | None:
        if not self.up:
            raise ConnectionError("the platform is unreachable")
        return await super().send(key, text)


async def test_a_dead_workers_channels_are_taken_over(database: str) -> None:
    """A worker stops answering with replies unsent and leases it never gives up (as a
    killed one): after the expiry another worker takes its channels, sends the replies
    and goes on with the conversations."""
    sender = RecordingSender()
    keys = [ChannelKey("test", str(c)) for c in range(5)]
    cut_off = DownSender()
    async with workers(database, 1, sender=cut_off) as (doomed,):
        for c in range(5):
            await doomed.runtime.receive(message(c, 1))
        await doomed.runtime.join()
        assert all(doomed.leases.holds(key) for key in keys)
        async with workers(database, 1, sender=sender, prefix="s") as (survivor,):
            await survivor.runtime.check_leases()
            await survivor.runtime.join()
            assert sender.sent == []  # the leases are still the doomed worker's
            await expire(database, "w0")
            await survivor.runtime.check_leases()
            await settle([survivor], lambda: len(sender.sent) == 5)
            for c in range(5):
                await survivor.runtime.receive(message(c, 2))
            await settle([survivor], lambda: len(sender.sent) == 10)
            # The doomed worker comes back to life and its platform too: the replies it
            # kept are the survivor's now (sent, above), so it sends none of them.
            cut_off.up = True
            for key in keys:
                doomed.runtime._wake(key)  # (its retry timers, without waiting for them)
            await doomed.runtime.join()
            assert cut_off.sent == []
            assert not any(doomed.leases.holds(key) for key in keys)
    for key in keys:
        assert sender.texts(key) == ["1:m1", "2:m2"]


async def test_sqlite_refuses_several_workers(tmp_path: Any) -> None:
    from turbobot.exceptions import ConfigurationError

    store = SQLStore(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", worker="w0")
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        await store.open()


def plan_of(*argv: str, **env: str) -> list[dict[str, str]]:
    from turbobot.cli import _parser
    from turbobot.workers import plan

    args = _parser().parse_args(["run", "bots.horoscope", *argv])
    return plan(args, {"TURBOBOT_DATABASE_URL": "postgresql+asyncpg://u@h/db", **env})


def test_workers_deal_discord_shards_out_and_are_named_apart() -> None:
    plans = plan_of("--platform", "discord", "--workers", "2", "--shard-count", "5")
    assert [p["DISCORD_SHARD_IDS"] for p in plans] == ["0,2,4", "1,3"]
    assert {p["DISCORD_SHARD_COUNT"] for p in plans} == {"5"}
    named = plan_of("--platform", "discord", "--workers", "3", TURBOBOT_WORKER_NAME="box")
    assert [p["TURBOBOT_WORKER_NAME"] for p in named] == ["box-0", "box-1", "box-2"]
    assert [p["DISCORD_SHARD_IDS"] for p in named] == ["0", "1", "2"]  # a shard each


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (("--workers", "3"), {}, "console is one terminal"),
        (("--platform", "telegram", "--workers", "2"), {}, "needs a webhook"),
        (
            ("--platform", "telegram", "--workers", "2"),
            {"TURBOBOT_DATABASE_URL": "sqlite+aiosqlite:///x.db"},
            "needs a PostgreSQL database",
        ),
        (("--platform", "discord", "--workers", "3", "--shard-count", "2"), {}, "as many shards"),
        (
            ("--platform", "discord", "--workers", "2", "--shard-ids", "0"),
            {},
            "without --shard-ids",
        ),
        (("--platform", "discord", "--workers", "0"), {}, "from 1 to 64"),
    ],
)
def test_workers_refuse_what_cannot_work(
    argv: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    from turbobot.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match=says):
        plan_of(*argv, **env)


async def test_status_needs_postgresql(tmp_path: Any, capsys: Any) -> None:
    from turbobot.cli import main

    code = await asyncio.to_thread(
        main, ["status", "--database", f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"]
    )
    assert code == 2
    assert "PostgreSQL" in capsys.readouterr().err


# -- found in review: each was reproduced before its fix -------------------------------


@contextlib.asynccontextmanager
async def crew_of(
    url: str, specs: list[tuple[str, Any, Any]], template: Any = asks, **runtime: Any
) -> AsyncIterator[list[Worker]]:
    """Workers named and equipped one by one: (name, llm, sender)."""
    async with contextlib.AsyncExitStack() as stack:
        crew = []
        for name, llm, sender in specs:
            store = SQLStore(url, worker=name, lease_seconds=600)
            await stack.enter_async_context(store)
            run = Runtime(template, llm=llm, sender=sender, store=store, **runtime)
            await stack.enter_async_context(run)
            crew.append(Worker(name, store, run))
        yield crew


async def unread(url: str) -> int:
    rows = await sql(url, "SELECT count(*) AS n FROM inbox WHERE NOT consumed")
    return int(rows[0]["n"])


async def test_a_step_begun_under_a_lost_lease_is_refused_though_the_channel_came_back(
    database: str,
) -> None:
    """A's step began under one lease; A lost it, B took the channel, answered and gave
    it up; A's own look at the leases must not take it back under A's running step
    (its writes would carry the new generation and pass)."""
    llms = GatedLLM(), GatedLLM()  # only "slow" texts wait for their gate
    sender = RecordingSender()
    key = ChannelKey("test", "1")
    async with crew_of(database, [("a", llms[0], sender), ("b", llms[1], sender)]) as crew:
        await crew[0].runtime.receive(message(1, 1))
        await settle(crew, lambda: len(sender.sent) == 1)
        await crew[0].runtime.receive(IncomingMessage(key, "slow one", "1-2", "u"))
        # Either worker may take the channel for it (the NOTIFY of the commit races the
        # receiver's own take, under load): the one whose step began plays A.
        waits = [asyncio.ensure_future(llm.started.wait()) for llm in llms]
        done, pending = await asyncio.wait(waits, timeout=10, return_when="FIRST_COMPLETED")
        for waiting in pending:
            waiting.cancel()
        assert done, "no worker began the slow step"
        first = 0 if llms[0].started.is_set() else 1
        a, b, gated = crew[first], crew[1 - first], llms[first]
        llms[1 - first].gate.set()  # B answers at once (the slow one too, once it has it)
        await expire(database, a.name)
        await b.runtime.receive(message(1, 3))
        await settle([b], lambda: len(sender.sent) == 3)
        await b.runtime.evict(key)
        await b.runtime.check_leases()  # idle: given up
        await a.runtime.receive(message(1, 4))  # A's channel worker is still in its step
        await a.runtime.check_leases()
        gated.gate.set()
        await settle([a, b], lambda: len(sender.sent) >= 4)
        await a.runtime.check_leases()
        await asyncio.gather(a.runtime.join(), b.runtime.join())
    assert sender.texts(key) == ["echo: m1", "echo: slow one", "echo: m3", "echo: m4"]


async def test_a_failed_release_leaves_the_channel_held_and_given_up_later(
    database: str,
) -> None:
    from sqlalchemy import text

    import turbobot.sql.leases as leases_module

    sender = RecordingSender()
    key = ChannelKey("test", "1")
    specs = [("a", GatedLLM(), sender), ("b", GatedLLM(), sender)]
    async with crew_of(database, specs, tally) as crew:
        await crew[0].runtime.receive(message(1, 1))
        await settle(crew, lambda: len(sender.sent) == 1)
        holder, other = holder_first(crew, key)
        await holder.runtime.evict(key)
        good = leases_module._RELEASE
        leases_module._RELEASE = text("SELECT no_such_column FROM leases")  # one failure
        try:
            with pytest.raises(Exception, match="no_such_column"):
                await holder.runtime.check_leases()
        finally:
            leases_module._RELEASE = good
        assert holder.leases.held() == [key]  # still held (and renewed), not forgotten
        await holder.runtime.check_leases()  # given up now
        assert holder.leases.held() == []
        for n in (2, 3):
            await other.runtime.receive(message(1, n))
            await settle(crew, lambda n=n: len(sender.sent) == n)
    assert sender.texts(key) == ["1:m1", "2:m2", "3:m3"]
    assert await unread(database) == 0


async def test_a_lone_worker_past_its_lease_mid_step_takes_its_channel_back(
    database: str,
) -> None:
    gated = GatedLLM()
    sender = RecordingSender()
    key = ChannelKey("test", "1")
    async with crew_of(database, [("a", gated, sender)]) as (a,):
        await a.runtime.receive(IncomingMessage(key, "slow one", "1-1", "u"))
        await gated.started.wait()
        await expire(database, "a")
        await a.runtime.check_leases()  # lost (its worker is busy: not taken back yet)
        gated.gate.set()
        await a.runtime.join()
        await a.runtime.check_leases()  # its own expired lease is free: taken back
        await settle([a], lambda: len(sender.sent) == 1)
    assert sender.texts(key) == ["echo: slow one"]
    assert gated.asked == ["slow one", "slow one"]  # the refused step's answer, asked again
    assert await unread(database) == 0


async def test_a_database_error_while_confirming_a_lease_is_retried(database: str) -> None:
    from turbobot.clock import FakeClock

    clock = FakeClock()
    sender = DownSender()
    key = ChannelKey("test", "1")
    settings = RuntimeSettings(retry_delays=(5.0,))
    async with crew_of(
        database, [("a", GatedLLM(), sender)], tally, settings=settings, clock=clock
    ) as (a,):
        await a.runtime.receive(message(1, 1))
        await a.runtime.join()  # the reply is kept: the platform is down
        real, calls = a.leases.confirm, []

        async def blip(k: ChannelKey) -> bool:
            calls.append(k)
            if len(calls) == 1:
                raise OSError("connection reset")
            return bool(await real(k))

        a.leases.confirm = blip
        sender.up = True
        for _ in range(3):
            clock.advance(6)  # the retry timers
            await a.runtime.join()
    assert len(calls) >= 2
    assert sender.texts(key) == ["1:m1"]
