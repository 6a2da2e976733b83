"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for tests.

Script replies with :meth:`FakeOpenAI.script`; without a script it echoes the last
user message. Every request body is recorded in ``requests``.

Run as a program (``python -m fakes.openai_server --port-file F``) it serves a paced
model until killed, for benchmarks: every streamed reply is ``--tokens`` chunks (one
token each, see :func:`paced_chunks`) after ``--first-token`` seconds, then one every
1/``--tokens-per-second``. ``GET /timings`` returns each request's arrival and
first-chunk times (``time.monotonic()``, comparable across processes on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
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
    #: streaming only: the content chunks as given (one token each) instead of pieces
    #: of 5 characters; ``content`` defaults to their concatenation
    chunks: Sequence[str] | None = None
    #: streaming only: seconds after the headers before the first chunk (the model's
    #: time to first token); unlike ``delay``, the client has its answer's headers
    first_delay: float = 0.0
    #: streaming only: content chunks on a fixed schedule, the k-th ``k * token_interval``
    #: seconds after the first (unlike ``chunk_delay``, a late write does not delay the
    #: later ones)
    token_interval: float = 0.0
    #: streaming only: the body as these pieces of bytes, each written (and flushed)
    #: on its own, instead of chunks built from the other fields (framing tests)
    sse: Sequence[bytes] | None = None
    #: with ``sse``: seconds the body stays open after its last piece (then it ends, or
    #: with ``cut_after`` set, the connection drops)
    hold_open: float = 0.0

    def __post_init__(self) -> None:
        if self.chunks is not None and not self.content:
            self.content = "".join(self.chunks)


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
        #: when each request's handling began (its headers were in) and when it had
        #: arrived whole (its body read), by index
        self.started_at: dict[int, float] = {}
        self.arrived_at: dict[int, float] = {}
        #: streaming: when each request's first content chunk was written (by index)
        self.first_chunk_at: dict[int, float] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        #: each request's client address (host, port): one port twice is one
        #: connection reused
        self.peers: list[tuple[str, int]] = []
        #: the content each streamed reply was written whole with (by index)
        self._streamed: dict[int, str] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply | str) -> None:
        self.replies.extend(Reply(content=r) if isinstance(r, str) else r for r in replies)

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/timings", self._timings)
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

    def timings(self) -> list[dict[str, Any]]:
        """Per request, in order: its last user message (``prompt``), when its handling
        began and when it had arrived whole, when its first content chunk and its end
        were written (``time.monotonic()``; ``None``: not written), and the content it
        was answered with (streamed replies written whole only)."""
        rows = []
        for index, body in enumerate(self.requests):
            users = [m for m in body.get("messages", ()) if m.get("role") == "user"]
            rows.append(
                {
                    "prompt": users[-1].get("content") if users else None,
                    "started": self.started_at.get(index),
                    "arrived": self.arrived_at.get(index),
                    "first": self.first_chunk_at.get(index),
                    "done": self.answered_at.get(index),
                    "text": self._streamed.get(index),
                }
            )
        return rows

    async def _timings(self, request: web.Request) -> web.Response:
        """``GET /timings``: this process's CPU seconds and :meth:`timings` (``?cpu``:
        the CPU seconds only)."""
        rows = [] if "cpu" in request.query else self.timings()
        return web.json_response({"cpu_s": time.process_time(), "requests": rows})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        body = await request.json()
        self.started_at[len(self.requests)] = started
        self.arrived_at[len(self.requests)] = time.monotonic()
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        self.peers.append(
            request.transport.get_extra_info("peername")[:2] if request.transport else ("", 0)
        )
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
            streamed = await self._stream(request, body, reply, index)
            if reply.cut_after is None and reply.end_after is None:
                self.answered_at[index] = time.monotonic()
                self._streamed[index] = reply.content
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
        self, request: web.Request, body: dict[str, Any], reply: Reply, index: int | None = None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if reply.sse is not None:
            for part in reply.sse:
                await response.write(part)
                await asyncio.sleep(0)  # its own read on the client's side, most often
            if reply.hold_open:
                await asyncio.sleep(reply.hold_open)
            if reply.cut_after is not None:
                _drop(request)
            else:
                await response.write_eof()
            return response
        if reply.first_delay:
            await asyncio.sleep(reply.first_delay)
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
        if reply.chunks is not None:
            pieces = list(reply.chunks)
        else:
            pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        loop = asyncio.get_running_loop()
        first = 0.0
        for sent in range(len(pieces) + 1):
            if reply.cut_after is not None and sent >= reply.cut_after:
                _drop(request)
                return response
            if reply.end_after is not None and sent >= reply.end_after:
                await response.write_eof()
                return response
            if sent == len(pieces):
                break
            if reply.token_interval and sent:
                await asyncio.sleep(max(0.0, first + sent * reply.token_interval - loop.time()))
            await send([{"index": 0, "delta": {"content": pieces[sent]}}])
            if sent == 0:
                first = loop.time()
                if index is not None:
                    self.first_chunk_at[index] = time.monotonic()
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


def _drop(request: web.Request) -> None:
    """Drop the connection: what was written is flushed, the chunked body's final chunk
    never is, so the client sees a connection error."""
    transport = request.transport
    assert transport is not None
    transport.close()


def paced_chunks(prompt: str, tokens: int) -> list[str]:
    """The reply the paced server streams for ``prompt``: ``tokens`` chunks, the first
    naming the prompt (a reply delivered to the wrong request shows)."""
    return [f"re:{prompt}", *(f" w{i}" for i in range(1, tokens))]


def paced(first_token: float, tokens_per_second: float, tokens: int) -> Callable[..., Reply]:
    """A ``respond`` for :class:`FakeOpenAI`: a realistically paced model."""
    interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0

    def respond(body: dict[str, Any]) -> Reply:
        users = [m for m in body["messages"] if m["role"] == "user"]
        prompt = str(users[-1]["content"]) if users else ""
        return Reply(
            chunks=paced_chunks(prompt, tokens), first_delay=first_token, token_interval=interval
        )

    return respond


def _write_port(path: str, port: int) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(str(port))
    os.replace(temporary, path)  # whole or absent, for a reader polling it


async def _serve(args: argparse.Namespace) -> None:
    server = FakeOpenAI(paced(args.first_token, args.tokens_per_second, args.tokens))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.port_file:
        _write_port(args.port_file, server.port)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if args.parent and os.getppid() != args.parent:
                break  # the process that started this one is gone
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fakes.openai_server",
        description="Serve a paced fake OpenAI model on 127.0.0.1 until killed.",
    )
    parser.add_argument("--port-file", help="write the port chosen here once serving")
    parser.add_argument("--first-token", type=float, default=0.3, help="seconds (0.3)")
    parser.add_argument("--tokens-per-second", type=float, default=50.0, help="(50)")
    parser.add_argument("--tokens", type=int, default=30, help="chunks per reply (30)")
    parser.add_argument("--parent", type=int, default=0, help="stop when this PID is gone")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
