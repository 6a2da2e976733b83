"""`turbobot new NAME` (issue 12): a new author scaffolds, tests offline and runs a bot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fakes.openai_server import FakeOpenAI
from tests.test_console import clean_env, run_console
from tests.test_testing_kit import assert_passes_alone
from turbobot.scaffold import new_bot


def turbobot(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "turbobot", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )


def test_a_new_bot_passes_its_test_where_it_was_written(tmp_path: Path) -> None:
    made = turbobot("new", "tea_expert", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert "turbobot run tea_expert.py" in made.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tea_expert.py", "test_tea_expert.py"]
    # with plain pytest and no configuration, as in the author's own project
    assert_passes_alone(tmp_path, "test_tea_expert.py")


async def test_a_new_bot_runs_in_the_console(tmp_path: Path, openai_server: FakeOpenAI) -> None:
    bot_file, _ = new_bot("tea_expert", tmp_path)
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url)
    code, out, err = await run_console("hello\n", env, str(bot_file))
    assert code == 0, err
    assert "echo: hello" in out
    assert openai_server.requests[0]["messages"][0]["content"].startswith("You are Tea Expert")


def test_bad_names_and_existing_files_are_refused_without_writing(tmp_path: Path) -> None:
    for name in ("Tea", "1tea", "tea-expert", "class", "x" * 65):
        refused = turbobot("new", name, cwd=tmp_path)
        assert refused.returncode == 2 and "cannot be a bot's module name" in refused.stderr
        assert "Traceback" not in refused.stderr
    (tmp_path / "test_mine.py").write_text("# mine\n")
    refused = turbobot("new", "mine", cwd=tmp_path)
    assert refused.returncode == 2 and "already exists; nothing was written" in refused.stderr
    assert not (tmp_path / "mine.py").exists()
    assert (tmp_path / "test_mine.py").read_text() == "# mine\n"
    missing = turbobot("new", "ok", "--directory", str(tmp_path / "nope"), cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
