"""A scripted LLM for tests: answers from a list (or a function), records every request."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeAlias

from turbobot.exceptions import LLMError
from turbobot.llm.base import DeltaCallback, LLMRequest, LLMResponse
from turbobot.messages import ToolCall

__all__ = ["ScriptedLLM"]

#: one scripted answer: text, a full response, or an error to raise
Reply: TypeAlias = str | LLMResponse | LLMError


class ScriptedLLM:
    """Answers each request with the next scripted reply.

    Args:
        replies: answers in order: a ``str``, an :class:`LLMResponse` (for tool calls)
            or an :class:`LLMError` instance to raise.
        respond: instead of a list, a function of the request returning a reply.
        chunk_size: characters per delta when streaming.

    ``requests`` lists every request received, so tests can check the prompt.
    """

    def __init__(
        self,
        replies: Iterable[Reply] = (),
        *,
        respond: Callable[[LLMRequest], Reply] | None = None,
        chunk_size: int = 4,
    ) -> None:
        self.replies: list[Reply] = list(replies)
        self.respond = respond
        self.chunk_size = chunk_size
        self.requests: list[LLMRequest] = []
        #: why it failed, once it ran out of replies (the test kit fails the test)
        self.exhausted: str | None = None

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse:
        self.requests.append(request)
        if self.respond is not None:
            reply = self.respond(request)
        elif self.replies:
            reply = self.replies.pop(0)
        else:
            self.exhausted = (
                f"ScriptedLLM ran out of replies at request {len(self.requests)} (the bot "
                f"generated once more than scripted); the prompt ended with "
                f"{_last_words(request)}. Script more replies"
            )
            raise AssertionError(self.exhausted)
        if isinstance(reply, LLMError):
            raise reply
        response = reply if isinstance(reply, LLMResponse) else LLMResponse(reply, (), None, "stop")
        if on_delta is not None:
            text = response.content
            for i in range(0, len(text), self.chunk_size):
                await on_delta(text[i : i + self.chunk_size])
        return response

    async def aclose(self) -> None:
        return None

    @staticmethod
    def tool_call(name: str, arguments: str, *, call_id: str = "call_1") -> LLMResponse:
        """A scripted reply in which the model calls tool ``name``."""
        return LLMResponse("", (ToolCall(call_id, name, arguments),), None, "tool_calls")


def _last_words(request: LLMRequest) -> str:
    if not request.messages:
        return "nothing"
    last = request.messages[-1]
    text = str(last.get("content") or "")
    return f"{last.get('role')}: {text[:80]!r}"
