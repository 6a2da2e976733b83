"""A reverse proxy on loopback that hands each request to the next upstream in turn:
the load balancer in front of several workers. An upstream that cannot be reached
gets a 502 (the caller, like Telegram, delivers again later)."""

from __future__ import annotations

import itertools
from types import TracebackType

import aiohttp
from aiohttp import web


class RoundRobinProxy:
    def __init__(self, upstreams: list[str]) -> None:
        #: base URLs, e.g. http://127.0.0.1:8001
        self.upstreams = upstreams
        self._next = itertools.cycle(range(len(upstreams)))
        self.port = 0
        #: how many requests each upstream answered, and how many failed
        self.answered = [0] * len(upstreams)
        self.failed = [0] * len(upstreams)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RoundRobinProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        index = next(self._next)
        assert self._session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        try:
            async with self._session.request(
                request.method, self.upstreams[index] + request.path_qs, data=body, headers=headers
            ) as response:
                content = await response.read()
                self.answered[index] += 1
                return web.Response(status=response.status, body=content)
        except (aiohttp.ClientError, TimeoutError):
            self.failed[index] += 1
            return web.Response(status=502, text="upstream unreachable")
