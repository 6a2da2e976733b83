"""Chat completions through the official ``openai`` client (any compatible server).

Retries are ours, not the client's (``max_retries=0`` on the client), so that the
policy is the same for streaming and non-streaming calls and ``retry-after`` is
honoured: timeouts, connection errors, 408, 409, 429 and 5xx are retried with
exponential backoff and jitter; other 4xx fail at once. When retries run out, an
:class:`~turbobot.exceptions.LLMError` subclass is raised into the template.

A stream is retried only while none of its text has reached ``on_delta``: once the
user may have seen a piece, a retry would show it again, so a stream that breaks off
raises :class:`~turbobot.exceptions.LLMUnavailableError` at once.

Errors carry the HTTP status and the provider's own message (one line, shortened,
with the API key scrubbed) and, for a refused request, a hint for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import openai
import orjson

from turbobot.exceptions import (
    LLMError,
    LLMRateLimitedError,
    LLMRequestError,
    LLMResponseError,
    LLMUnavailableError,
)
from turbobot.llm.base import DeltaCallback, LLMRequest, LLMResponse
from turbobot.messages import ToolCall, Usage

__all__ = ["OpenAILLM", "RetryPolicy"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to retry a failed completion.

    Attempt ``n`` (from 0) waits ``min(max_delay, base_delay * 2**n)`` scaled by a
    random factor in [0.5, 1]; a server's ``retry-after`` replaces that wait when it
    is given and not above ``max_retry_after``.
    """

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
            return retry_after
        backoff: float = min(self.max_delay, self.base_delay * 2**attempt)
        return backoff * random.uniform(0.5, 1.0)


#: the longest provider message kept in an error (characters)
_MAX_PROVIDER_MESSAGE = 300
_BEARER = re.compile(r"(?i)\bbearer\s+\S+")
#: a 400 about the prompt's size (not, say, "max_tokens is too large")
_TOO_LARGE = re.compile(
    r"(?i)context[ _](length|window)|maximum context|prompt is too long|"
    r"too many (input |prompt )?tokens|(request|payload|input) (is )?too (large|long)"
)
_HINT_KEY = "check OPENAI_API_KEY"
_HINT_ACCESS = "the key has no access to this model or endpoint"
_HINT_MODEL = "the model name is unknown to this server; check TURBOBOT_MODEL/--model"
_HINT_URL = "the server has no such endpoint; check OPENAI_BASE_URL (usually ending in /v1)"
_HINT_SIZE = "the prompt is too large for the model"


def _provider_error(exc: openai.APIError) -> tuple[str | None, str | None]:
    """The provider's own error message and code, as the client received them.

    The client keeps the ``error`` object of an OpenAI-style body as ``exc.body``; other
    servers send ``{"error": "text"}``, ``{"detail": ...}`` or plain text.
    """
    body: object = exc.body
    if isinstance(body, Mapping) and "error" in body:
        body = body["error"]
    message: object = None
    code: object = None
    if isinstance(body, Mapping):
        message = body.get("message", body.get("detail"))
        code = body.get("code")
    elif isinstance(body, str):
        message = body
    return (
        message if isinstance(message, str) and message.strip() else None,
        code if isinstance(code, str) else None,
    )


def _hint(status: int, message: str | None, code: str | None) -> str | None:
    """One line telling the operator what to check for a refused request."""
    said = f"{code or ''} {message or ''}"
    if status == 401:
        return _HINT_KEY
    if status == 403:
        return _HINT_ACCESS
    if status == 404:
        return _HINT_MODEL if "model" in said.lower() else _HINT_URL
    if status == 413 or (status == 400 and _TOO_LARGE.search(said)):
        return _HINT_SIZE
    return None


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class OpenAILLM:
    """An :class:`~turbobot.llm.base.LLM` backed by ``openai.AsyncOpenAI``.

    Args:
        api_key: the key; ``None`` reads ``OPENAI_API_KEY`` (the client's own rule).
        base_url: an OpenAI-compatible endpoint such as ``http://127.0.0.1:8080/v1``.
        timeout: seconds per HTTP request.
        retry: the retry policy.
        client: an already built client (then the other arguments are ignored).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._client = client or openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> OpenAILLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def complete(
        self, request: LLMRequest, *, on_delta: DeltaCallback | None = None
    ) -> LLMResponse:
        shown = 0  # characters handed to on_delta: once there are any, no retry

        async def deliver(delta: str) -> None:
            nonlocal shown
            assert on_delta is not None
            shown += len(delta)
            await on_delta(delta)

        attempt = 0
        while True:
            try:
                if on_delta is None:
                    return await self._complete_once(request)
                return await self._stream_once(request, deliver)
            except openai.APIError as exc:
                cause = None if self._mentions_key(exc) else exc
                if shown:
                    raise self._broken_stream(exc, shown) from cause
                error, retryable = self._translate(exc)
                if not retryable or attempt + 1 >= self.retry.attempts:
                    raise error from cause
                retry_after = error.retry_after if isinstance(error, LLMRateLimitedError) else None
                wait = self.retry.delay(attempt, retry_after)
                _log.warning(
                    "LLM request failed (%s, attempt %d of %d), retrying in %.2fs: %s",
                    type(exc).__name__,
                    attempt + 1,
                    self.retry.attempts,
                    wait,
                    self._scrub(str(exc)),
                )
            await asyncio.sleep(wait)
            attempt += 1

    def _scrub(self, text: str) -> str:
        """``text`` on one line, without the API key or bearer tokens, shortened."""
        key = self._client.api_key
        if key and len(key) >= 4:
            text = text.replace(key, "***")
        text = _BEARER.sub("Bearer ***", text)
        text = " ".join(text.split())
        if len(text) > _MAX_PROVIDER_MESSAGE:
            text = text[:_MAX_PROVIDER_MESSAGE].rstrip() + "…"
        return text

    def _mentions_key(self, exc: openai.APIError) -> bool:
        """Whether the client's exception repeats the key (then it is not chained)."""
        key = self._client.api_key
        return bool(key) and len(key) >= 4 and (key in str(exc) or key in repr(exc.body))

    def _provider_message(self, exc: openai.APIError) -> str | None:
        message, _ = _provider_error(exc)
        return None if message is None else self._scrub(message)

    def _broken_stream(self, exc: openai.APIError, shown: int) -> LLMError:
        """The error for a stream that failed after ``shown`` characters reached the user."""
        said = self._provider_message(exc)
        cause = f"{type(exc).__name__}: {said}" if said else type(exc).__name__
        return LLMUnavailableError(
            f"the LLM stream broke off after {shown} characters ({cause}); not retried, "
            "since that part of the reply was already shown"
        )

    def _translate(self, exc: openai.APIError) -> tuple[LLMError, bool]:
        """Our error for a client error, and whether it is worth retrying."""
        attempts = self.retry.attempts
        message, code = _provider_error(exc)
        said = None if message is None else self._scrub(message)
        quoted = f": {said}" if said else ""
        if isinstance(exc, openai.RateLimitError):
            return LLMRateLimitedError(
                f"the LLM server kept answering 429 Too Many Requests after {attempts} "
                f"attempts{quoted}; slow down or raise your quota",
                retry_after=_retry_after(exc),
            ), True
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return LLMUnavailableError(
                f"the LLM server is unavailable ({type(exc).__name__}) after {attempts} "
                "attempts; check OPENAI_BASE_URL and that the server is running"
            ), True
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            if status >= 500:
                return LLMUnavailableError(
                    f"the LLM server failed with HTTP {status} after {attempts} attempts{quoted}"
                ), True
            retryable = status in (408, 409)  # a timeout or a conflict may pass
            hint = _hint(status, message, code)
            text = f"the LLM server rejected the request with HTTP {status} ({type(exc).__name__})"
            if retryable:
                text += f" after {attempts} attempts"
            text += quoted
            text += f"; {hint}" if hint else "; check the model name, key and settings"
            return LLMRequestError(
                text, status_code=status, provider_message=said, hint=hint
            ), retryable
        return LLMResponseError(
            f"the LLM server's answer is not a valid chat completion{quoted}"
        ), False

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.settings)
        params["model"] = request.model
        # The prompt and the tool schemas are plain JSON already. Given as ``messages=``
        # the client walks every message against its type hints before sending (about
        # 0.5 ms a message here: 7 answers a second at a few hundred messages); in
        # ``extra_body`` they are merged into the JSON body as they are. ``messages=[]``
        # stays for the client's required-argument check and is replaced by the merge.
        extra = {"messages": request.messages}
        if request.tools:
            extra["tools"] = request.tools
        params["messages"] = []
        params["extra_body"] = {**extra, **(params.get("extra_body") or {})}
        return params

    async def _complete_once(self, request: LLMRequest) -> LLMResponse:
        completion = await self._client.chat.completions.create(**self._params(request))
        try:
            choice = completion.choices[0]
            message = choice.message
            calls = tuple(
                ToolCall(c.id, c.function.name, c.function.arguments or "")
                for c in (message.tool_calls or ())
                if c.type == "function"
            )
            content = message.content or ""
            finish = choice.finish_reason
        except (AttributeError, IndexError, TypeError, KeyError) as exc:
            raise LLMResponseError(
                "the LLM server's answer has no usable choices; is OPENAI_BASE_URL an "
                "OpenAI-compatible chat completions endpoint?"
            ) from exc
        if not isinstance(content, str):
            raise LLMResponseError("the LLM server's answer content is not text")
        usage = None
        if completion.usage is not None:
            usage = Usage(
                completion.usage.prompt_tokens or 0, completion.usage.completion_tokens or 0
            )
        return LLMResponse(content, calls, usage, finish, getattr(completion, "model", None))

    async def _stream_once(self, request: LLMRequest, on_delta: DeltaCallback) -> LLMResponse:
        params = self._params(request)
        params["stream"] = True
        params["stream_options"] = {"include_usage": True}
        parts: list[str] = []
        calls: dict[int, list[str]] = {}
        usage = None
        finish = None
        model = None
        # The client makes the request, raises its status errors and closes the
        # response; the chunks are read here as JSON (docs/architecture.md, "LLM
        # backends": building the client's typed chunk objects cost ~0.2 ms a chunk).
        create = self._client.chat.completions.with_streaming_response.create
        async with create(**params) as response:
            async for data in _sse_data(response):
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    raise LLMResponseError(
                        "the LLM server streamed a chunk that is not JSON"
                    ) from exc
                if not isinstance(chunk, dict):
                    raise LLMResponseError("the LLM server streamed a chunk that is not an object")
                error = chunk.get("error")
                if error:
                    said = error.get("message") if isinstance(error, dict) else None
                    raise openai.APIError(
                        said
                        if isinstance(said, str) and said
                        else "An error occurred during streaming",
                        response.http_response.request,
                        body=error,
                    )
                try:
                    texts, said_finish, said_usage, said_model = _read_chunk(chunk, calls)
                except (AttributeError, TypeError, KeyError, ValueError) as exc:
                    raise LLMResponseError(
                        "the LLM server streamed chunks turbobot cannot read"
                    ) from exc
                finish = said_finish or finish
                usage = said_usage or usage
                model = said_model or model
                for text in texts:  # (outside the try: the callback's errors are its own)
                    parts.append(text)
                    await on_delta(text)
        if finish is None:
            # The connection ended tidily, but the model never said it was done: the
            # text is cut short (a missing [DONE] alone is not an error).
            raise LLMResponseError(
                f"the LLM stream ended before the model finished (no finish_reason, "
                f"{sum(map(len, parts))} characters received); a proxy or the server "
                "closed it early"
            )
        tool_calls = tuple(ToolCall(*calls[i]) for i in sorted(calls))
        return LLMResponse("".join(parts), tool_calls, usage, finish, model)


def _read_chunk(
    chunk: dict[str, Any], calls: dict[int, list[str]]
) -> tuple[list[str], str | None, Usage | None, str | None]:
    """A streamed chunk's text pieces, finish reason, usage and model; its tool call
    pieces are added to ``calls`` (by index: id, name, arguments). A chunk not shaped
    as the API documents raises ``TypeError``, ``KeyError``, ``ValueError`` or
    ``AttributeError``."""
    texts = []
    finish = None
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta is not None:
            content = delta.get("content")
            if content:
                texts.append(_text(content))
            for call in delta.get("tool_calls") or ():
                index = call["index"]
                if type(index) is not int:
                    raise TypeError("tool call index")
                slot = calls.setdefault(index, ["", "", ""])
                if call.get("id"):
                    slot[0] = _text(call["id"])
                function = call.get("function")
                if function is not None:
                    slot[1] += _text(function.get("name") or "")
                    slot[2] += _text(function.get("arguments") or "")
        if choice.get("finish_reason"):
            finish = _text(choice["finish_reason"])
    reported = chunk.get("usage")
    usage = None
    if reported is not None:
        usage = Usage(
            int(reported.get("prompt_tokens") or 0), int(reported.get("completion_tokens") or 0)
        )
    model = chunk.get("model")
    return texts, finish, usage, None if model is None else _text(model)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


#: how long the rest of a body after ``[DONE]`` is read for reusing its connection
_DRAIN_SECONDS = 0.1
#: the largest server-sent event read (a line without an end would grow without bound)
_MAX_EVENT_BYTES = 16 * 2**20
#: an SSE line ends with CR LF, LF or CR
_LINE_END = re.compile(rb"\r\n|\r|\n")


async def _sse_data(response: openai.AsyncAPIResponse[Any]) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event of ``response`` until ``[DONE]``.

    After ``[DONE]`` the rest of the body is read (for at most ``_DRAIN_SECONDS``, its
    errors ignored: the reply is whole) so that the connection can be reused. Before
    it, a failure while reading is the client's :class:`openai.APIConnectionError` (then
    :meth:`OpenAILLM.complete` retries or reports it as for a failed request); an
    event left unfinished at the end of the body is dropped, as the SSE standard says.
    """
    body = response.iter_bytes()
    held: list[bytes] = []  # the start of a line still arriving
    held_size = 0
    data: list[bytes] = []
    data_size = 0
    while True:
        try:
            piece = await anext(body)
        except StopAsyncIteration:
            return
        except Exception as exc:  # whatever the transport raised: the connection failed
            raise openai.APIConnectionError(
                message=f"the stream failed while being read ({type(exc).__name__})",
                request=response.http_response.request,
            ) from exc
        if b"\n" not in piece and b"\r" not in piece:
            # more of one line: kept aside, not joined (a long line in many pieces
            # would otherwise be copied and scanned again for each)
            held.append(piece)
            held_size += len(piece)
            if held_size + data_size > _MAX_EVENT_BYTES:
                raise _too_large()
            continue
        pending = b"".join((*held, piece)) if held else piece
        tail = b""
        if pending.endswith(b"\r"):  # perhaps the first half of a CR LF
            pending, tail = pending[:-1], b"\r"
        *lines, rest = _LINE_END.split(pending) if b"\r" in pending else pending.split(b"\n")
        held = [rest + tail] if rest or tail else []
        held_size = len(rest) + len(tail)
        for line in lines:
            if not line:  # a blank line ends the event
                if data:
                    joined = b"\n".join(data)
                    data = []
                    data_size = 0
                    if joined.strip() == b"[DONE]":
                        await _drain(body)
                        return
                    yield joined
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
                data_size += len(value)
            # other fields (event, id, retry) and comments (":") carry nothing we use
        if held_size + data_size > _MAX_EVENT_BYTES:
            raise _too_large()


def _too_large() -> LLMResponseError:
    return LLMResponseError(
        f"the LLM server streamed an event of more than {_MAX_EVENT_BYTES // 2**20} MiB "
        "(a chat completion chunk is a few KB); the stream was dropped"
    )


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Read what is left of a finished stream's body, if it comes soon; its errors do not
    matter (the reply is whole), and if it is cut short the connection is closed."""
    with contextlib.suppress(Exception):  # TimeoutError included
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for _ in body:
                pass
