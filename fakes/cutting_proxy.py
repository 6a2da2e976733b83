"""A TCP proxy on 127.0.0.1 that can lose the answer to a PostgreSQL COMMIT.

Armed with :meth:`CuttingProxy.cut_next_commit`, it forwards the next ``COMMIT`` to
the server, waits for the server's answer, drops it and closes the client's
connection: the transaction is committed, and the client cannot know it (an
ambiguous commit, as when the network fails at that moment).
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self._armed = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut_next_commit(self) -> None:
        self._armed = True

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        committing = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self._armed and b"COMMIT" in data.upper():
                    self._armed = False
                    committing.set()
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if committing.is_set():
                    # The server committed and answered: the answer never arrives.
                    self.cuts += 1
                    client_w.transport.abort()
                    server_w.close()
                    return
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.gather(upstream(), downstream())
