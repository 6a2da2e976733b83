"""The console bot end to end: a subprocess fed through a pipe, against the fake server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO

import pytest

from fakes.openai_server import FakeOpenAI, Reply

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without our variables, with a fresh SQLite database."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "TURBOBOT_", "TELEGRAM_", "DISCORD_"))
    }
    database = Path(tempfile.mkdtemp(prefix="turbobot-test-")) / "turbobot.db"
    env["TURBOBOT_DATABASE_URL"] = f"sqlite+aiosqlite:///{database}"
    env.update(extra)
    return env


async def spawn_turbobot(
    env: dict[str, str],
    *args: str,
    stdin: int = asyncio.subprocess.PIPE,
    stdout: int = asyncio.subprocess.PIPE,
    module: str = "turbobot",
    stderr: int | IO[bytes] = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """``python -m turbobot ARGS`` from the repository root; its stderr is piped (or
    written to ``stderr``, a file, for a long run whose log would fill a pipe).

    ``module="fakes.faulty_cli"`` runs the same command with faults injected.
    """
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=ROOT,
        env=env,
    )


async def communicate(
    proc: asyncio.subprocess.Process,
    data: bytes | None = None,
    timeout: float = 60.0,  # noqa: ASYNC109 - the kill on expiry is the point
) -> tuple[bytes, bytes]:
    """``proc.communicate(data)`` within ``timeout``; on a timeout (or any failure) the
    process is killed, so that a failing test leaves no bot running behind it."""
    try:
        return await asyncio.wait_for(proc.communicate(data), timeout)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise


async def run_console(stdin: str, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await spawn_turbobot(env, "run", *args)
    out, err = await communicate(proc, stdin.encode())
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_horoscope_through_a_pipe(openai_server: FakeOpenAI) -> None:
    openai_server.script("Leo, fortune favours the bold this week.", Reply(content="Love is near."))
    env = clean_env(OPENAI_API_KEY="sk-test-secret", OPENAI_BASE_URL=openai_server.base_url)
    code, out, err = await run_console(
        "hello\nI am a Leo\nWhat about money?\nAnd love?\n", env, "bots.horoscope"
    )
    assert code == 0, err
    assert out.splitlines() == [
        "Welcome, traveller. What is your zodiac sign?",
        "Ah, Leo. What do you want to know?",
        "Leo, fortune favours the bold this week.",
        "Love is near.",
    ]
    assert len(openai_server.requests) == 2
    last = openai_server.requests[-1]
    assert last["temperature"] == 0.9 and last["max_tokens"] == 200
    assert last["messages"][-1] == {"role": "user", "content": "And love?"}
    assert "sk-test-secret" not in out + err


async def test_streaming_assistant_from_a_file_path(openai_server: FakeOpenAI) -> None:
    openai_server.script("Streaming works fine.")
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL=openai_server.base_url)
    code, out, err = await run_console(
        "hi\n", env, str(ROOT / "bots" / "assistant.py"), "--channel", "room", "--model", "gpt-4o"
    )
    assert code == 0, err
    assert out == "Streaming works fine.\n"
    assert openai_server.requests[0]["stream"] is True
    assert openai_server.requests[0]["model"] == "gpt-4o"


async def test_llm_outage_apologises_and_exits_cleanly(openai_server: FakeOpenAI) -> None:
    openai_server.script(*[Reply(status=500)] * 20)
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL=openai_server.base_url)
    code, out, err = await run_console("hi\n", env, "bots.assistant")
    assert code == 0, err
    assert "Sorry, I could not answer just now" in out


async def test_unknown_bot_module_is_a_clear_error() -> None:
    code, _, err = await run_console("", clean_env(OPENAI_API_KEY="k"), "bots.nope")
    assert code == 2
    assert "cannot import bot module 'bots.nope'" in err


async def test_a_hostile_console_session_loses_nothing(
    openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    """Issue 10, defects 11 and 13: bytes no decoder likes, a 2 MB line, then a normal one."""
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL=openai_server.base_url)
    database = f"sqlite+aiosqlite:///{tmp_path / 'hostile.db'}"
    lines = [
        b"",
        b"   \t",
        b"x" * 2_000_000,
        b"nul\x00byte",
        b"surrogate \xed\xa0\x80 bytes",
        b"invalid \xff\xfe utf-8",
        "rtl \u202eevil\u202c \u05e9\u05dc\u05d5\u05dd".encode(),
        b"/nonsense",
        b"the normal line",
    ]
    proc = await spawn_turbobot(env, "run", "bots.assistant", "--database", database)
    out, err = await communicate(proc, b"\n".join(lines) + b"\n", timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    text = out.decode()
    assert text.rstrip("\n").endswith("echo: the normal line")
    assert "Your message was too long" in text
    assert text.count("Part of your message could not be read") == 3
    assert "echo: invalid \ufffd\ufffd utf-8" in text
    assert "echo: rtl \u202eevil\u202c \u05e9\u05dc\u05d5\u05dd" in text
    # Every non-empty line was stored and used; the original bytes are kept.
    import sqlite3

    db = sqlite3.connect(tmp_path / "hostile.db")
    payloads = [json.loads(p) for (p,) in db.execute("SELECT payload FROM inbox ORDER BY seq")]
    assert len(payloads) == 7
    assert db.execute("SELECT count(*) FROM inbox WHERE consumed = 0").fetchone() == (0,)
    raw = payloads[3]["raw_text"]
    assert raw.encode("utf-8", "surrogateescape") == b"invalid \xff\xfe utf-8"
    assert len(openai_server.requests) == 6  # every text line but the command reached the model
    longest = max(len(r["messages"][-1]["content"]) for r in openai_server.requests)
    assert longest <= 16_000


def test_in_a_terminal_the_console_greets_resumes_and_ends_its_line(tmp_path: Path) -> None:
    """Issue 10, defect 20: what a newcomer sees in a real (pseudo-)terminal."""
    import pty
    import select
    import subprocess

    database = f"sqlite+aiosqlite:///{tmp_path / 'tty.db'}"
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL="http://127.0.0.1:9/v1")

    def session(*lines: bytes) -> str:
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "turbobot", "run", "bots.horoscope", "--database", database],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            close_fds=True,
        )
        os.close(slave)
        seen = b""

        def read_until(marker: bytes) -> None:
            nonlocal seen
            while marker not in seen:
                ready, _, _ = select.select([master], [], [], 30)
                assert ready, f"no {marker!r} in {seen.decode(errors='replace')!r}"
                seen += os.read(master, 4096)

        read_until(b"> ")
        for line in lines:
            os.write(master, line + b"\n")
            read_until(b"?")
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
        with contextlib.suppress(OSError):  # the rest, up to the end of the terminal
            while select.select([master], [], [], 1)[0]:
                chunk = os.read(master, 4096)
                if not chunk:
                    break
                seen += chunk
        os.close(master)
        return seen.decode().replace("\r\n", "\n")

    first = session(b"hello")
    assert first.startswith("turbobot: I am Madame Turbo, a fortune teller.")
    assert "Ctrl-D quits" in first and "resuming" not in first
    assert "Welcome, traveller. What is your zodiac sign?" in first
    assert first.endswith("> \n")  # Ctrl-D: the prompt's line is ended
    again = session()
    assert "(resuming your conversation; /start begins a new one)" in again


@pytest.mark.slow
async def test_lines_piped_in_at_once_are_all_answered_in_order_once(
    openai_server: FakeOpenAI, tmp_path: Path
) -> None:
    """Issue 13's battery: thousands of lines at once into the console (CONSOLE_LINES,
    default 2,000 in CI; 10,000 by `make crash`'s size): every one answered, in order,
    exactly once, one model call each."""
    count = int(os.environ.get("CONSOLE_LINES", "2000"))
    env = clean_env(OPENAI_API_KEY="k", OPENAI_BASE_URL=openai_server.base_url)
    database = f"sqlite+aiosqlite:///{tmp_path / 'flood.db'}"
    lines = [f"line {n}" for n in range(count)]
    proc = await spawn_turbobot(env, "run", "tests.crash_bot:flood_chat", "--database", database)
    stdin = ("\n".join(lines) + "\n").encode()
    out, err = await communicate(proc, stdin, timeout=60 + count / 20)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().splitlines() == [f"echo: {line}" for line in lines]
    assert len(openai_server.requests) == count


async def test_a_bot_that_outlives_its_test_is_killed() -> None:
    """The helper the CLI tests wait with: a timeout kills the process (a timed-out
    flood test once left two bots running, eating the CPU of later runs)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", stdin=asyncio.subprocess.PIPE
    )
    with pytest.raises(TimeoutError):
        await communicate(proc, b"", timeout=0.2)
    assert proc.returncode is not None
