"""The console adapter: each stdin line is a user message, each reply is printed.

Works with a terminal and with a pipe (scripted sessions); needs no extra packages.
Input is read as bytes and decoded leniently and losslessly (invalid UTF-8 becomes
lone surrogates, which the runtime shows the template as U+FFFD and stores as they
came); a line longer than ``max_line_bytes`` is cut there, so no line can fill RAM.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, TextIO

from turbobot.chat import ChannelKey, IncomingMessage
from turbobot.runtime import BaseSender, Runtime

if TYPE_CHECKING:
    from turbobot.platforms import Launch
from turbobot.template import INTERRUPTED, AssistantStream

__all__ = ["ConsoleAdapter", "run_platform"]

#: the longest line read whole (bytes); the rest of a longer line is skipped
MAX_LINE_BYTES = 1 << 20


class ConsoleAdapter(BaseSender):
    """Talks to one channel on stdin/stdout.

    Args:
        channel: the channel name (conversations are stored under it).
        user: the name of the person typing.
        stdin / stdout: streams to use (the process's by default). A text stream
            without a binary buffer (``io.StringIO``) is read as text.
        stderr: where the greeting and prompts go in a terminal.
        max_line_bytes: the longest line read whole.
    """

    def __init__(
        self,
        *,
        channel: str = "console",
        user: str = "user",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.key = ChannelKey("console", channel)
        self.user = user
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.max_line_bytes = max_line_bytes
        self._ids = itertools.count(1)

    @property
    def interactive(self) -> bool:
        return self.stdin.isatty()

    async def send(self, key: ChannelKey, text: str) -> str | None:
        self._write(text + "\n")
        return str(next(self._ids))

    async def send_stream(self, key: ChannelKey, stream: AssistantStream) -> str | None:
        async for delta in stream:
            self._write(delta)
        if not stream.text:
            return None
        # A part printed before the generation broke off stays on screen, marked.
        self._write(INTERRUPTED + "\n" if stream.interrupted else "\n")
        return str(next(self._ids))

    def _write(self, text: str) -> None:
        # A terminal or pipe that cannot show a character gets a replacement, not a crash.
        encoding = getattr(self.stdout, "encoding", None) or "utf-8"
        self.stdout.write(text.encode(encoding, "replace").decode(encoding))
        self.stdout.flush()

    def _read_lines(self, emit: Callable[[str], None]) -> None:
        """Read stdin (in the reader thread), calling ``emit`` with each line."""
        buffer: BinaryIO | None = getattr(self.stdin, "buffer", None)
        limit = self.max_line_bytes
        if buffer is None:  # a text stream (tests): already decoded
            for text in self.stdin:
                emit(text.rstrip("\r\n")[:limit])
            return
        while True:
            line = buffer.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                # Too long: keep the first part, skip the rest of the line unread.
                line = line[:limit]
                while (rest := buffer.readline(1 << 16)) and not rest.endswith(b"\n"):
                    pass
            emit(line.rstrip(b"\r\n").decode("utf-8", "surrogateescape"))

    def _start_reader(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
        # A daemon thread, so a blocked readline never holds up interpreter exit.
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def emit(line: str | None) -> None:
            loop.call_soon_threadsafe(lines.put_nowait, line)

        def read() -> None:
            try:
                self._read_lines(emit)
            finally:  # even if reading failed: the bot must not wait for ever
                emit(None)

        threading.Thread(target=read, name="turbobot-stdin", daemon=True).start()
        return lines

    def _greet(self, runtime: Runtime) -> None:
        if not self.interactive:
            return
        doc = (runtime.template.fn.__doc__ or "").strip().splitlines()
        about = doc[0].strip() if doc else runtime.template.ref
        self.stderr.write(f"turbobot: {about}\nType a message and press Enter; Ctrl-D quits.\n")
        if runtime.has_conversation(self.key):
            self.stderr.write("(resuming your conversation; /start begins a new one)\n")
        self.stderr.flush()

    async def run(self, runtime: Runtime) -> None:
        """Feed stdin to ``runtime`` until EOF, then wait for the last replies."""
        await runtime.start()
        self._greet(runtime)
        lines = self._start_reader(asyncio.get_running_loop())
        count = itertools.count(1)
        session = uuid.uuid4().hex[:12]
        while True:
            if self.interactive:
                self.stderr.write("> ")
                self.stderr.flush()
            line = await lines.get()
            if line is None:
                if self.interactive:
                    self.stderr.write("\n")  # Ctrl-D left the cursor after the prompt
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


async def run_platform(launch: Launch) -> None:
    """``turbobot run --platform console``: one channel on stdin and stdout."""
    adapter = ConsoleAdapter(channel=launch.args.channel)
    # SIGTERM (a service manager's stop) stops like Ctrl-C: steps in flight finish or
    # are left exactly resumable (Runtime.aclose), nothing is cut half way.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with (
            launch.parts() as (template, store, llm),
            Runtime(
                template,
                llm=llm,
                sender=adapter,
                store=store,
                settings=launch.settings,
                modes=launch.modes,
                metrics=launch.metrics,
            ) as runtime,
        ):
            await adapter.run(runtime)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
