"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

Script replies with :meth:`FakeOpenAI.script`; without a script it echoes the last
user message. Every request body is recorded in ``requests``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    """One scripted answer."""

    content: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: str | None = None
    delay: float = 0.0
    #: streaming only: seconds between content chunks (of 5 characters)
    chunk_delay: float = 0.0
    #: non-200 only: the ``error`` object of the body (default: a "fake error" one)
    error: dict[str, Any] | None = None
    #: streaming only: drop the connection abruptly after this many content chunks
    #: (the chunked body is left unfinished, so the client sees a connection error)
    cut_after: int | None = None
    #: streaming only: end the response cleanly after this many content chunks,
    #: without a finish_reason, usage or ``[DONE]`` (a premature but tidy end)
    end_after: int | None = None


def echo(body: dict[str, Any]) -> Reply:
    users = [m for m in body["messages"] if m["role"] == "user"]
    return Reply(content=f"echo: {users[-1]['content']}" if users else "hello")


class FakeOpenAI:
    def __init__(self, respond: Callable[[dict[str, Any]], Reply] = echo) -> None:
        self.respond = respond
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        #: when each request's answer was written out whole (by index; absent if it
        #: was not: an error, a cut, or a client that went away)
        self.answered_at: dict[int, float] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply | str) -> None:
        self.replies.extend(Reply(content=r) if isinstance(r, str) else r for r in replies)

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        reply = self.replies.pop(0) if self.replies else self.respond(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.raw is not None:
            return web.Response(
                status=reply.status, text=reply.raw, content_type="application/json"
            )
        if reply.status != 200:
            default = {"message": f"fake error {reply.status}", "type": "fake"}
            error = {"error": default if reply.error is None else reply.error}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        if body.get("stream"):
            index = len(self.requests) - 1
            streamed = await self._stream(request, body, reply)
            if reply.cut_after is None and reply.end_after is None:
                self.answered_at[index] = time.monotonic()
            return streamed
        message: dict[str, Any] = {"role": "assistant", "content": reply.content or None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                for i, (n, a) in enumerate(reply.tool_calls)
            ]
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            }
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
        }

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "choices": choices, **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        text = reply.content
        pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        for sent in range(len(pieces) + 1):
            if reply.cut_after is not None and sent >= reply.cut_after:
                transport = request.transport
                assert transport is not None
                transport.close()  # flushes what was written, never the final chunk
                return response
            if reply.end_after is not None and sent >= reply.end_after:
                await response.write_eof()
                return response
            if sent == len(pieces):
                break
            await send([{"index": 0, "delta": {"content": pieces[sent]}}])
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        for i, (name, args) in enumerate(reply.tool_calls):
            head = {
                "index": i,
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            await send([{"index": 0, "delta": {"tool_calls": [head]}}])
            for j in range(0, len(args), 4):
                piece = {"index": i, "function": {"arguments": args[j : j + 4]}}
                await send([{"index": 0, "delta": {"tool_calls": [piece]}}])
        finish = "tool_calls" if reply.tool_calls else "stop"
        await send([{"index": 0, "delta": {}, "finish_reason": finish}])
        await send([], usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
