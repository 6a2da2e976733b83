"""Issue 10, defect 19: ordinary mistakes give one line on stderr and exit 2, no traceback.

Each test runs the real command without our environment variables: ``turbobot run``,
and what is about the process (logging, the local model), as ``python -m turbobot``
from the repository root; the other commands through ``main`` in this process (a
traceback there is an exception that fails the test). Nothing leaves the machine: the
OpenAI backend points at port 1 of 127.0.0.1 and no message ever reaches it;
PostgreSQL is "refused" by the same port, where nothing listens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.test_console import ROOT, clean_env
from turbobot.cli import _parser, main

Result = subprocess.CompletedProcess[str]
Cli = Callable[..., Result]

#: an LLM that needs no model and is never asked anything
OFFLINE_LLM = {"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}
REFUSING_POSTGRES = "postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/x"
MISSING = "sqlite+aiosqlite:////nonexistent/dir/x.db"


def turbobot(*args: str, env: dict[str, str] | None = None) -> Result:
    """``python -m turbobot ARGS``, fed one line."""
    return subprocess.run(
        [sys.executable, "-m", "turbobot", *args],
        input="hi\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(**OFFLINE_LLM) if env is None else env,
        timeout=60,
    )


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """``cli(*args, **env)``: ``main(args)`` here, in an empty directory, with only ``env``
    of our variables; its exit status and output as a subprocess would give them."""
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "TURBOBOT_", "TELEGRAM_", "DISCORD_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    def run(*args: str, **env: str) -> Result:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def one_line_error(result: Result, code: int = 2) -> str:
    """The single ``turbobot: ...`` line the command printed, after checking the rest."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("turbobot: "), lines
    assert result.returncode == code, result.stderr
    return lines[0]


# -- database URLs ---------------------------------------------------------------------


def test_synchronous_sqlite_url_names_the_async_driver(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    line = one_line_error(turbobot("run", "bots.horoscope", "--database", url))
    assert "--database" in line and "async driver" in line
    assert f"sqlite+aiosqlite:///{tmp_path / 'x.db'}" in line


def test_synchronous_postgresql_url_from_the_environment_hides_the_password(cli: Cli) -> None:
    url = "postgresql://bob:hunter2@127.0.0.1:1/x"
    line = one_line_error(cli("conversations", TURBOBOT_DATABASE_URL=url))
    assert "TURBOBOT_DATABASE_URL" in line and "async driver" in line
    assert "postgresql+asyncpg://bob:***@127.0.0.1:1/x" in line
    assert "hunter2" not in line


def missing_directory(line: str, source: str = "--database") -> None:
    assert "/nonexistent/dir" in line and "does not exist" in line and source in line


def test_run_with_a_database_in_a_missing_directory() -> None:
    missing_directory(one_line_error(turbobot("run", "bots.horoscope", "--database", MISSING)))


@pytest.mark.parametrize("command", [("db", "upgrade"), ("transcript", "room"), ("conversations",)])
def test_database_in_a_missing_directory(cli: Cli, command: tuple[str, ...]) -> None:
    missing_directory(one_line_error(cli(*command, "--database", MISSING)))


def test_missing_directory_from_the_environment_names_the_variable(cli: Cli) -> None:
    line = one_line_error(cli("conversations", TURBOBOT_DATABASE_URL=MISSING))
    missing_directory(line, source="TURBOBOT_DATABASE_URL")


def test_a_file_that_is_not_a_database(cli: Cli, tmp_path: Path) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("these are my notes, not a database\n" * 200)
    line = one_line_error(cli("conversations", "--database", f"sqlite+aiosqlite:///{notes}"))
    assert "cannot open the database" in line and "not a database" in line


def refused(line: str, source: str = "--database") -> None:
    assert "cannot open the database" in line and f"(from {source})" in line
    assert "postgresql+asyncpg://postgres:***@127.0.0.1:1/x" in line
    assert "hunter2" not in line


def test_run_with_postgresql_refusing_the_connection() -> None:
    refused(one_line_error(turbobot("run", "bots.horoscope", "--database", REFUSING_POSTGRES)))


@pytest.mark.parametrize("action", ["upgrade", "current"])
def test_postgresql_refusing_the_connection(cli: Cli, action: str) -> None:
    refused(one_line_error(cli("db", action, "--database", REFUSING_POSTGRES)))


def test_postgresql_refusing_names_the_environment_variable(cli: Cli) -> None:
    result = cli("db", "current", TURBOBOT_DATABASE_URL=REFUSING_POSTGRES)
    refused(one_line_error(result), source="TURBOBOT_DATABASE_URL")


@pytest.mark.parametrize("url", ["not a url://", "::"])
def test_unparsable_url(cli: Cli, url: str) -> None:
    line = one_line_error(cli("db", "current", "--database", url))
    assert "--database" in line and "URL" in line


# -- logging and the local model -------------------------------------------------------


def test_unknown_log_level_flag() -> None:
    line = one_line_error(turbobot("--log-level", "bogus", "conversations", "--database", "memory"))
    assert "--log-level" in line and "'bogus'" in line and "WARNING" in line


def test_unknown_log_level_from_the_environment() -> None:
    env = clean_env(TURBOBOT_LOG_LEVEL="loud")
    line = one_line_error(turbobot("conversations", "--database", "memory", env=env))
    assert "TURBOBOT_LOG_LEVEL" in line and "'loud'" in line


def test_local_model_that_is_a_text_file(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_text("not a model\n")
    env = clean_env(TURBOBOT_LOCAL_MODEL=str(model))
    line = one_line_error(turbobot("run", "bots.horoscope", "--llm", "local", env=env))
    assert "TURBOBOT_LOCAL_MODEL" in line and "GGUF" in line and str(model) in line


@pytest.mark.skipif(find_spec("xllamacpp") is None, reason="the local extra is not installed")
def test_local_model_that_llama_cpp_cannot_load(tmp_path: Path) -> None:
    model = tmp_path / "broken.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # the signature, then nothing
    env = clean_env(TURBOBOT_LOCAL_MODEL=str(model))
    line = one_line_error(turbobot("run", "bots.horoscope", "--llm", "local", env=env))
    assert "TURBOBOT_LOCAL_MODEL" in line and "could not be loaded" in line


# -- the read-only commands and the help -----------------------------------------------


def test_transcript_of_an_unknown_channel_exits_1(cli: Cli, tmp_path: Path) -> None:
    database = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    line = one_line_error(cli("transcript", "nobody-here", "--database", database), code=1)
    assert "no messages in console:nobody-here" in line


def test_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, command in {"turbobot": parser, **commands}.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    assert "where the bot talks" in capsys.readouterr().out


def test_a_channel_reads_as_conversations_prints_it() -> None:
    """`turbobot conversations` prints per-member keys (discord:123:user=7); `transcript`
    takes them back (review of issue 11)."""
    from turbobot.chat import ChannelKey
    from turbobot.cli import parse_channel
    from turbobot.exceptions import ConfigurationError

    keys = [
        ChannelKey("discord", "123", None, "7"),
        ChannelKey("telegram", "-100", "5"),
        ChannelKey("telegram", "-100", "5", "9"),
    ]
    assert [parse_channel(str(key)) for key in keys] == keys
    assert parse_channel("telegram:5:6") == ChannelKey("telegram", "5", "6")
    assert parse_channel("console") == ChannelKey("console", "console")
    for bad in ("", "a:", "discord:1:user=", "discord:1:colour=2", "a:b:c:d:e"):
        with pytest.raises(ConfigurationError, match="is not NAME"):
            parse_channel(bad)
