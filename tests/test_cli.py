"""Choosing the LLM backend, and what a user sees when something is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_console import ROOT, clean_env
from turbobot import ConfigurationError
from turbobot.cli import build_llm, choose_llm
from turbobot.llm.local import LocalLLM
from turbobot.llm.openai import OpenAILLM
from turbobot.sql.migrate import head_revision


def test_key_present_means_openai() -> None:
    assert choose_llm(None, {"OPENAI_API_KEY": "sk-x"}) == "openai"
    assert choose_llm(None, {"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}) == "openai"


def test_no_key_means_local() -> None:
    assert choose_llm(None, {}) == "local"
    assert choose_llm(None, {"OPENAI_API_KEY": ""}) == "local"


def test_explicit_choice_wins() -> None:
    assert choose_llm("local", {"OPENAI_API_KEY": "sk-x"}) == "local"
    assert choose_llm(None, {"OPENAI_API_KEY": "sk-x", "TURBOBOT_LLM": "local"}) == "local"
    assert choose_llm("openai", {"TURBOBOT_LLM": "local", "OPENAI_API_KEY": "k"}) == "openai"
    with pytest.raises(ConfigurationError, match="unknown LLM backend 'gpt'"):
        choose_llm("gpt", {})


async def test_build_llm_makes_the_chosen_backend() -> None:
    openai_llm = build_llm("openai", {"OPENAI_API_KEY": "k"})
    assert isinstance(openai_llm, OpenAILLM)
    await openai_llm.aclose()
    local = build_llm("local", {"TURBOBOT_LOCAL_MODEL": "/models/x.gguf"})
    assert isinstance(local, LocalLLM) and local.model_path == "/models/x.gguf"
    with pytest.raises(ConfigurationError, match="needs OPENAI_API_KEY"):
        build_llm("openai", {})


async def test_the_llm_timeout_comes_from_its_variable() -> None:
    llm = build_llm("openai", {"OPENAI_API_KEY": "k", "TURBOBOT_LLM_TIMEOUT": "2.5"})
    assert isinstance(llm, OpenAILLM) and llm._client.timeout == 2.5
    await llm.aclose()
    for bad in ("soon", "0", "-1", "nan", "inf"):
        with pytest.raises(ConfigurationError, match=f"TURBOBOT_LLM_TIMEOUT .* got '{bad}'"):
            build_llm("openai", {"OPENAI_API_KEY": "k", "TURBOBOT_LLM_TIMEOUT": bad})


def test_missing_local_extra_names_the_install_command() -> None:
    # Hide xllamacpp from the import system, as on a machine without the extra.
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'xllamacpp': raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from turbobot.cli import main\n"
        "sys.exit(main(['run', 'bots.horoscope']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input="hi\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert "pip install 'turbobot[local]'" in result.stderr
    assert "make install" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_local_model_file_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "turbobot", "run", "bots.horoscope"],
        input="hi\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=clean_env(TURBOBOT_LOCAL_MODEL="/nonexistent/model.gguf"),
    )
    assert result.returncode == 2
    assert "local model file '/nonexistent/model.gguf' does not exist" in result.stderr


def turbobot(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turbobot", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_db_transcript_and_conversations_commands(tmp_path: Path) -> None:
    from tests.test_runtime import survey  # noqa: F401 - imported for its module path

    env = clean_env(TURBOBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    created = turbobot("db", "upgrade", env=env)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"{head_revision()} (up to date)"
    assert turbobot("db", "current", env=env).stdout.strip() == f"{head_revision()} (up to date)"

    ran = turbobot(
        "run",
        "tests.test_runtime:survey",
        "--channel",
        "room",
        env=env,
        stdin="hi\nAnn\ngreen\nhello again\n",
    )
    assert ran.returncode == 0, ran.stderr
    shown = turbobot("transcript", "room", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("--- conversation ") and lines[0].endswith("(finished)")
    assert lines[1:7] == [
        "user: hi",
        "assistant: What is your name?",
        "user: Ann",
        "assistant: Hi Ann. Favourite colour?",
        "user: green",
        "assistant: Ann likes green.",
    ]
    assert lines[7].endswith("(waiting)") and lines[8:] == [
        "user: hello again",
        "assistant: What is your name?",
    ]
    header, *listed = turbobot("conversations", env=env).stdout.splitlines()
    assert header.split("\t") == ["channel", "conversation", "started", "state"]
    assert [line.split("\t")[0] for line in listed] == ["console:room", "console:room"]
    assert [line.split("\t")[-1] for line in listed] == ["finished", "waiting"]


def test_bad_database_url_is_a_clear_error() -> None:
    result = turbobot("conversations", env=clean_env(TURBOBOT_DATABASE_URL="turbobot.db"))
    assert result.returncode == 2
    assert "must be an SQLAlchemy async URL" in result.stderr
