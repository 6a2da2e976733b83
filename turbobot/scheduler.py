"""Per-channel scheduling: one worker task per channel that has work, one step at a time.

Channels run concurrently; within a channel, steps never overlap. A wake while the
channel's worker runs is not lost: the worker runs its step again before it ends.
See docs/architecture.md, "Data flow of one message".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ChannelWorkers"]

K = TypeVar("K", bound=Hashable)


class ChannelWorkers(Generic[K]):
    """Runs ``step(key)`` in a task per key, again while wakes arrive, never two at once.

    ``step`` returns ``False`` to stop early (after an error it handled): the key's
    worker then ends even if woken meanwhile; the next wake starts a new one.
    """

    def __init__(self, step: Callable[[K], Awaitable[bool]], *, name: str = "turbobot") -> None:
        self._step = step
        self._name = name
        self._tasks: dict[K, asyncio.Task[None]] = {}
        #: keys woken since their worker last started a step
        self._dirty: set[K] = set()

    def wake(self, key: K) -> None:
        """Make sure ``key``'s step runs (again) soon."""
        self._dirty.add(key)
        if key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"{self._name}:{key}")

    def busy(self, key: K) -> bool:
        return key in self._tasks

    def tasks(self) -> list[tuple[K, asyncio.Task[None]]]:
        return list(self._tasks.items())

    async def join(self) -> None:
        """Wait until no key has work. Cancelling the wait does not cancel the workers."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def _run(self, key: K) -> None:
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                if not await self._step(key):
                    return
        finally:
            # No await between the last dirty check and this: a wake that came meanwhile
            # either set dirty before the check or starts a new worker after.
            del self._tasks[key]
