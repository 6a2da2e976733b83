"""The anchors' two-step conversation as a turbobot template, for bench_telegram.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from turbobot import GetUserInput, Result, turbo


@turbo()
async def twostep() -> AsyncIterator[Any]:
    name = yield GetUserInput("What's your name?")
    yield Result(f"Hello {name}")


bot = twostep
