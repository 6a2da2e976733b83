"""turbobot.scheduler: per-channel workers, one step at a time, wakes never lost."""

from __future__ import annotations

import asyncio

from turbobot.scheduler import ChannelWorkers


async def test_a_wake_during_a_step_runs_it_again_and_steps_never_overlap() -> None:
    running: set[str] = set()
    runs: list[str] = []
    gate = asyncio.Event()

    async def step(key: str) -> bool:
        assert key not in running, "two steps of one key at once"
        running.add(key)
        runs.append(key)
        if len(runs) == 1:
            await gate.wait()
        running.discard(key)
        return True

    workers: ChannelWorkers[str] = ChannelWorkers(step)
    workers.wake("a")
    workers.wake("b")
    await asyncio.sleep(0)  # both workers start; "a" waits at the gate
    workers.wake("a")  # while "a" runs: runs once more, after
    workers.wake("a")  # wakes coalesce
    assert workers.busy("a")
    gate.set()
    await workers.join()
    assert sorted(runs) == ["a", "a", "b"] and not workers.busy("a")


async def test_a_step_that_stops_ends_its_worker_and_the_next_wake_starts_one() -> None:
    calls = 0

    async def step(key: str) -> bool:
        nonlocal calls
        calls += 1
        return False

    workers: ChannelWorkers[str] = ChannelWorkers(step)
    workers.wake("a")
    await workers.join()
    workers.wake("a")
    await workers.join()
    assert calls == 2
