"""The console adapter: each stdin line is a user message, each reply is printed.

Works with a terminal and with a pipe (scripted sessions); needs no extra packages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import threading
import uuid
from typing import TextIO

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.runtime import BaseSender, Runtime
from turbobot.template import AssistantStream

__all__ = ["ConsoleAdapter"]


class ConsoleAdapter(BaseSender):
    """Talks to one channel on stdin/stdout.

    Args:
        channel: the channel name (conversations are stored under it).
        user: the name of the person typing.
        stdin / stdout: streams to use (the process's by default).
        kill_before_send: for crash tests only: kill the process with SIGKILL right
            before sending a reply that contains this text.
    """

    def __init__(
        self,
        *,
        channel: str = "console",
        user: str = "user",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        kill_before_send: str | None = None,
    ) -> None:
        self.key = ChannelKey("console", channel)
        self.user = user
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self._ids = itertools.count(1)
        # A testing aid for crash tests: SIGKILL this process just before sending a
        # reply that contains this text (after the reply was recorded).
        self.kill_before_send = kill_before_send

    @property
    def interactive(self) -> bool:
        return self.stdin.isatty()

    async def send(self, key: ChannelKey, text: str) -> str | None:
        if self.kill_before_send and self.kill_before_send in text:
            os.kill(os.getpid(), signal.SIGKILL)
        self.stdout.write(text + "\n")
        self.stdout.flush()
        return str(next(self._ids))

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        async for delta in stream:
            self.stdout.write(delta)
            self.stdout.flush()
        if not stream.text:
            return None
        self.stdout.write("\n")
        self.stdout.flush()
        return str(next(self._ids))

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
        # A daemon thread, so a blocked readline never holds up interpreter exit.
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:
            for line in self.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, name="turbobot-stdin", daemon=True).start()
        return lines

    async def run(self, runtime: Runtime) -> None:
        """Feed stdin to ``runtime`` until EOF, then wait for the last replies."""
        lines = self._start_reader(asyncio.get_running_loop())
        count = itertools.count(1)
        session = uuid.uuid4().hex[:12]
        while True:
            if self.interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = await lines.get()
            if line is None:
                break
            if not line.strip():
                continue
            await runtime.receive(
                IncomingMessage(
                    key=self.key,
                    text=line,
                    # unique across runs: a durable inbox must not take a new line
                    # typed after a restart for a redelivery of an old one
                    message_id=f"{session}-{next(count)}",
                    author_id=self.user,
                    author_name=self.user,
                )
            )
            # One step at a time keeps a scripted transcript in order with its input.
            await runtime.join()
        await runtime.join()
