"""The bot of the bad-input battery (tests/test_bad_input.py): it says exactly what it
read, on one line, so that each adapter's outcome can be compared to the same table."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from turbobot import GetUserInput, Result, turbo

#: a message that makes the template raise (the channel must recover)
BREAK = "please break"


def echo(text: str) -> str:
    """The probe's answer to ``text``: its length and the repr of its start."""
    return f"read {len(text)}: {text[:40]!r}"


@turbo()
async def probe() -> AsyncIterator[Any]:
    """Says what it read."""
    while True:
        said = yield GetUserInput()
        if said == BREAK:
            raise RuntimeError("the template broke on purpose")
        yield Result(echo(str(said)))
