"""A database on a disk that fills up, then has room again (issue 10, defect 12).

The console bot's database lives on a small tmpfs mounted for the test (needs root,
as CI runs; skipped elsewhere). The disk is filled while messages arrive, then freed:
every message is answered, in order, without a restart, and the log says what
happened.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fakes.openai_server import FakeOpenAI
from tests.conftest import fill
from tests.test_console import clean_env, communicate, spawn_turbobot

pytestmark = pytest.mark.slow


async def test_a_full_disk_costs_no_input_and_needs_no_restart(
    small_disk: Path, openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL=openai_server.base_url)
    database = f"sqlite+aiosqlite:///{small_disk / 'bot.db'}"
    proc = await spawn_turbobot(env, "run", "bots.assistant", "--database", database)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"first\n")
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"echo: first\n"

    filler = small_disk / "filler"
    fill(filler)
    lines = [f"during {i} ".encode() + b"y" * 3000 for i in range(5)]
    proc.stdin.write(b"\n".join(lines) + b"\n")
    await proc.stdin.drain()
    # Wait until the store has met the full disk (its warning), then free the space.
    warning = b""
    while b"database or disk is full" not in warning:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, f"the bot stopped: {warning.decode()[-3000:]}"
        warning += line
    filler.unlink()

    proc.stdin.write(b"after\n")
    proc.stdin.close()
    out, err = await communicate(proc)
    assert proc.returncode == 0, (warning + err).decode()[-3000:]
    assert out.decode().splitlines() == [
        *(f"echo: {line.decode()}" for line in lines),
        "echo: after",
    ]
    assert b"commits go through again" in err
