"""Platforms are found by entry point (issue 10): turbobot's own, and a third party's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.test_cli import turbobot
from tests.test_console import clean_env
from turbobot import platforms

ROOT = Path(__file__).resolve().parent.parent


def test_turbobots_own_platforms_are_entry_points() -> None:
    found = platforms.available()
    assert {"console", "telegram", "discord"} <= set(found)
    assert found["console"].value == "turbobot.adapters.console:run_platform"


def run(*args: str, pythonpath: str = "") -> subprocess.CompletedProcess[str]:
    # the horoscope's first answer needs no model: the key and URL are never used
    env = clean_env(
        PYTHONPATH=pythonpath, OPENAI_API_KEY="k", OPENAI_BASE_URL="http://127.0.0.1:9/v1"
    )
    return turbobot(*args, env=env)


def test_an_unknown_platform_is_one_clear_line() -> None:
    done = run("run", "bots.horoscope", "--platform", "matrix", "--database", "memory")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "no platform named 'matrix'" in line
    assert "console" in line and "telegram" in line and "discord" in line


def test_a_third_party_platform_is_found_and_runs_the_bot(tmp_path: Path) -> None:
    """A distribution installed beside turbobot declares a platform; `run` uses it."""
    info = tmp_path / "echoplat-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echoplat\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[turbobot.platforms]\necho = echoplat:run_platform\n")
    (tmp_path / "echoplat.py").write_text(
        "from turbobot import ChannelKey, IncomingMessage\n"
        "from turbobot.runtime import BaseSender, Runtime\n"
        "class Printer(BaseSender):\n"
        "    async def send(self, key, text):\n"
        "        print(f'[{key.channel}] {text}')\n"
        "        return None\n"
        "async def run_platform(launch):\n"
        "    async with launch.parts() as (template, store, llm):\n"
        "        async with Runtime(template, llm=llm, sender=Printer(), store=store,\n"
        "                           settings=launch.settings) as runtime:\n"
        "            hi = IncomingMessage(ChannelKey('echo', 'room'), 'hi', '1')\n"
        "            await runtime.receive(hi)\n"
        "            await runtime.join()\n"
    )
    done = run(
        "run", "bots.horoscope", "--platform", "echo", "--database", "memory",
        "--llm", "openai", pythonpath=str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[room] Welcome, traveller. What is your zodiac sign?"]
