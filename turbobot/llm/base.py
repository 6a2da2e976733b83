"""The shape every LLM backend has: a request in, a response out, deltas while streaming."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from turbobot.messages import Assistant, ToolCall, Usage

__all__ = ["LLM", "DeltaCallback", "LLMRequest", "LLMResponse"]

#: called with each text fragment while a reply streams
DeltaCallback = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """One chat completion to make.

    ``settings`` holds the remaining model parameters (``temperature``,
    ``max_tokens``, ``top_p``, ...), passed through to the server.
    """

    messages: list[dict[str, Any]]
    model: str
    settings: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LLMResponse:
    """A completion: text and/or tool calls, plus reported usage."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage | None = None
    finish_reason: str | None = None
    model: str | None = None

    def to_message(self, *, forward: bool = True) -> Assistant:
        return Assistant(
            self.content, tool_calls=self.tool_calls, usage=self.usage, forward=forward
        )


@runtime_checkable
class LLM(Protocol):
    """What the engine needs from a language model.

    ``complete`` returns the whole response; when ``on_delta`` is given the backend
    streams and calls it with each text fragment as it arrives. Backends raise
    :class:`~turbobot.exceptions.LLMError` subclasses and handle their own retries.
    """

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse: ...

    async def aclose(self) -> None: ...
