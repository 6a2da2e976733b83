"""A general chat assistant: answers every message, remembering the conversation."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from turbobot import Generate, GetUserInput, System, User, turbo


@turbo(temperature=0.7)
async def assistant(
    system: str = "You are a helpful, concise assistant.",
) -> AsyncGenerator[Any, Any]:
    """A helpful assistant. Ask me anything."""
    yield System(content=system)
    while True:
        message = yield GetUserInput()
        yield User(content=message)
        yield Generate(stream=True)


bot = assistant
