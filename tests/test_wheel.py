"""turbobot installed from its wheel, away from the checkout (issue 10, packaging).

The wheel is built from the checkout without build isolation (setuptools comes from
the dev extra: nothing is downloaded), installed into a fresh virtual environment
whose dependencies are the test venv's packages, and run from an empty directory:
it must claim no top-level names but ``turbobot``, and find its own migrations.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(
    *args: str | Path, cwd: Path, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), **env},
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--quiet", "-w", out, ROOT, cwd=out,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (found,) = out.glob("turbobot-*.whl")
    return found


def test_the_wheel_claims_only_the_turbobot_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"turbobot"}
    for needed in (
        "turbobot/adapters/console.py",
        "turbobot/bots/horoscope.py",
        "turbobot/migrations/env.py",
        "turbobot/migrations/script.py.mako",
        "turbobot/migrations/versions/0001_initial_schema.py",
        "turbobot/py.typed",
    ):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "turbobot = turbobot.cli:main" in text


def test_an_installed_wheel_upgrades_its_database_and_runs_a_bot(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    # The dependencies: the test venv's packages, on the path after the wheel's own
    # (a plain path: the checkout's editable install is not activated there).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run(
        sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", site, wheel,
        cwd=tmp_path,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    where = run(python, "-c", "import turbobot; print(turbobot.__file__)", cwd=work)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    database = f"sqlite+aiosqlite:///{work / 'bot.db'}"
    upgraded = run(python, "-m", "turbobot", "db", "upgrade", "--database", database, cwd=work)
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    assert "up to date" in upgraded.stdout
    chat = run(
        python, "-m", "turbobot", "run", "bots.horoscope", "--database", database,
        "--llm", "openai", cwd=work, stdin="hello\n",
        OPENAI_API_KEY="unused", OPENAI_BASE_URL="http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.splitlines() == ["Welcome, traveller. What is your zodiac sign?"]
