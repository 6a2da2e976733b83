"""Time for the runtime: epoch seconds and timers, from the system or from a test.

The runtime takes deadlines (``GetUserInput(timeout=...)``) and retry delays from its
clock, so a test can move time forwards with :class:`FakeClock` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "TimerHandle"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Epoch seconds when called, and timers that follow them."""

    def __call__(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle: ...


class SystemClock:
    """The wall clock, and the running event loop's timers."""

    __slots__ = ()

    def __call__(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback, *args)


class _FakeTimer:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Time that moves only when :meth:`advance` moves it (for tests).

    Timers due at or before the current time run at the event loop's next turn, as a
    real timer of delay 0 would; later ones when :meth:`advance` reaches them, in order
    of their due time.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        timer = _FakeTimer(self.now + max(0.0, delay), callback, args)
        if delay <= 0:
            asyncio.get_running_loop().call_soon(self._fire, timer)
        else:
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> int:
        """Timers not yet due (cancelled ones excluded)."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> int:
        """Move time forwards by ``seconds`` and run the timers now due; how many ran."""
        if seconds < 0:
            raise ValueError(f"FakeClock.advance() moves forwards only, got {seconds!r}")
        self.now += seconds
        fired = 0
        while self._timers and self._timers[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                fired += 1
                self._fire(timer)
        return fired

    @staticmethod
    def _fire(timer: _FakeTimer) -> None:
        if not timer.cancelled:
            timer.cancelled = True  # once
            timer.callback(*timer.args)
