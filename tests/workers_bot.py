"""The bot of the multi-worker suites: it numbers each message of a conversation, so
that a message processed twice, skipped or out of order shows in its replies."""

from __future__ import annotations

from turbobot import Generate, GetUserInput, Result, User, turbo


@turbo()
async def tally():
    """Numbers each message."""
    n = 0
    while True:
        said = yield GetUserInput()
        n += 1
        yield Result(f"{n}:{said}")


@turbo()
async def asks():
    """Asks the model about each message."""
    while True:
        said = yield GetUserInput()
        yield User(content=said)
        yield Generate()
