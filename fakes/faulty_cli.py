"""The ``turbobot`` command with faults injected from outside, for crash tests.

``python -m fakes.faulty_cli ARGS`` runs ``turbobot ARGS``; with
``TEST_KILL_BEFORE_SEND=TEXT`` the process kills itself (SIGKILL) right before the
console prints a reply containing TEXT, after the reply was recorded. The production
adapter knows nothing of this.
"""

from __future__ import annotations

import os
import signal
import sys

from turbobot.adapters.console import ConsoleAdapter
from turbobot.chat import ChannelKey
from turbobot.cli import main


def _inject() -> None:
    text = os.environ.get("TEST_KILL_BEFORE_SEND")
    if not text:
        return
    send = ConsoleAdapter.send

    async def send_or_die(self: ConsoleAdapter, key: ChannelKey, reply: str) -> str | None:
        if text in reply:
            os.kill(os.getpid(), signal.SIGKILL)
        return await send(self, key, reply)

    ConsoleAdapter.send = send_or_die  # type: ignore[method-assign]


if __name__ == "__main__":
    _inject()
    sys.exit(main())
