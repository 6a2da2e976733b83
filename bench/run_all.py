"""Every benchmark of bench/, in one pass, then bench/RESULTS.md and the plots (`make bench`).

usage: python bench/run_all.py [--chats 1000,10000,100000] [--rounds 3] [--rounds-100k 1]
           [--only REGEX] [--skip REGEX] [--million 1000000] [--report-only]

1. The anchors (bench/anchors: python-telegram-bot, aiogram, discord.py) get their own
   virtualenv (bench/.anchors-venv, from bench/anchors/requirements.txt, made once).
2. The two-step workload from the same platform payloads, turbobot and every anchor,
   for each C: the cells of a round run one after the other and the rounds alternate,
   so every ratio compares figures of the same round. Disk-bound or quadratic anchor
   cells run fewer times or not at all where they would take hours (see ``CELLS``).
3. A million waiting conversations (bench_million.py), reply latency under a streaming
   model (bench_latency.py, 100 and 1,000 channels), one long conversation
   (bench_long.py), scale-out on PostgreSQL (bench_workers.py, when PostgreSQL's
   binaries are installed: `make postgres`).
4. bench/report.py writes bench/RESULTS.md and bench/*.png from the JSON lines kept
   in bench/results/raw.jsonl (each line also names its cell, round and time).

A cell that fails is recorded as failed (its stderr's tail kept) and the pass goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ANCHORS = BENCH / "anchors"
ANCHOR_VENV = BENCH / ".anchors-venv"
RESULTS = BENCH / "results"
RAW = RESULTS / "raw.jsonl"


@dataclass(frozen=True)
class Cell:
    name: str  # what the report calls it
    script: str  # relative to bench/
    args: tuple[str, ...]
    anchor: bool = False  # runs in the anchors' virtualenv, from bench/anchors
    max_chats: int | None = None  # not run above this C (quadratic or hours long)
    runs_at_most: dict[int, int] | None = None  # C -> runs (disk-bound cells)


CELLS = [
    Cell("turbobot telegram, SQLite FULL", "bench_e2e.py", ("telegram", "sqlite")),
    Cell("turbobot telegram, memory", "bench_e2e.py", ("telegram", "memory")),
    Cell(
        "turbobot telegram via PTB objects, SQLite FULL", "bench_e2e.py", ("telegram-ptb", "sqlite")
    ),
    Cell("turbobot discord, SQLite FULL", "bench_e2e.py", ("discord", "sqlite")),
    Cell("turbobot core (IncomingMessage in), SQLite FULL", "bench_turbobot.py", ("sqlite",)),
    Cell("PTB ConversationHandler, memory", "bench_ptb.py", ("memory",), anchor=True),
    # PicklePersistence rewrites the whole file per changed key at the flush: O(C^2)
    Cell(
        "PTB + PicklePersistence",
        "bench_ptb.py",
        ("pickle",),
        anchor=True,
        max_chats=10_000,
        runs_at_most={10_000: 1},
    ),
    Cell("aiogram FSM, memory", "bench_aiogram.py", ("memory",), anchor=True),
    Cell(
        "aiogram FSM, SQLite storage",
        "bench_aiogram.py",
        ("sqlite",),
        anchor=True,
        runs_at_most={100_000: 1},
    ),
    # every waiting listener's check runs on every message: O(C^2)
    Cell("discord.py wait_for", "bench_discord.py", ("wait_for",), anchor=True, max_chats=10_000),
]


def anchor_python() -> Path:
    """The anchors' interpreter, its virtualenv made (once) from requirements.txt."""
    python = ANCHOR_VENV / "bin" / "python"
    stamp = ANCHOR_VENV / ".requirements"
    wanted = (ANCHORS / "requirements.txt").read_text()
    if not python.exists() or not stamp.exists() or stamp.read_text() != wanted:
        print("# making the anchors' virtualenv (bench/.anchors-venv)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(ANCHOR_VENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-r",
                str(ANCHORS / "requirements.txt"),
            ],
            check=True,
        )
        stamp.write_text(wanted)
    return python


def record(line: dict[str, object]) -> None:
    RESULTS.mkdir(exist_ok=True)
    with RAW.open("a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


def run(
    command: list[str], *, cwd: Path, meta: dict[str, object], timeout: float = 7200
) -> list[dict[str, object]]:
    """Run one benchmark; keep each JSON line it prints, with ``meta``."""
    started = time.time()
    print(
        f"# {time.strftime('%H:%M:%S')} {meta.get('cell')} {' '.join(command[1:])}", file=sys.stderr
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        stdout, stderr, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout or "" if isinstance(exc.stdout, str) else ""
        stderr, code = f"timed out after {timeout:.0f} s", -1
    lines = []
    for text in stdout.splitlines():
        if text.startswith("{"):
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    if code != 0 or not lines:
        failure = {**meta, "failed": True, "returncode": code, "stderr": stderr[-2000:]}
        record(failure)
        print(f"#   failed ({code}): {stderr.strip()[-300:]}", file=sys.stderr)
        return []
    kept = []
    for line in lines:
        line = {**meta, **line, "wall_s": round(time.time() - started, 1)}
        record(line)
        kept.append(line)
    print(f"#   {json.dumps(lines[-1])[:300]}", file=sys.stderr)
    return kept


def machine() -> dict[str, object]:
    def version(python: str, module: str) -> str:
        code = f"import importlib.metadata as m; print(m.version({module!r}))"
        try:
            return subprocess.run(
                [python, "-c", code], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return "not installed"

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import sqlite3

    anchors = str(ANCHOR_VENV / "bin" / "python")
    return {
        "machine": True,
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(int(memory) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "turbobot_commit": commit + ("+changes" if dirty else ""),
        "versions": {
            "python-telegram-bot": version(sys.executable, "python-telegram-bot"),
            "discord.py": version(sys.executable, "discord.py"),
            "SQLAlchemy": version(sys.executable, "SQLAlchemy"),
            "openai": version(sys.executable, "openai"),
            "anchors: python-telegram-bot": version(anchors, "python-telegram-bot"),
            "anchors: aiogram": version(anchors, "aiogram"),
            "anchors: discord.py": version(anchors, "discord.py"),
        },
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--chats", default="1000,10000,100000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rounds-100k", type=int, default=1, help="rounds at C >= 100,000")
    parser.add_argument("--only", default=".", help="regex over the parts and cells to run")
    parser.add_argument("--skip", default="^$", help="regex over the parts and cells to skip")
    parser.add_argument("--million", type=int, default=1_000_000)
    parser.add_argument("--latency-seconds", type=int, default=30)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--fresh", action="store_true", help="start a new pass (the old raw.jsonl is kept aside)"
    )
    args = parser.parse_args()
    wanted = re.compile(args.only)
    unwanted = re.compile(args.skip)

    def chosen(name: str) -> bool:
        return bool(wanted.search(name)) and not unwanted.search(name)

    if not args.report_only:
        if args.fresh and RAW.exists():
            RAW.rename(RAW.with_suffix(f".{int(time.time())}.jsonl"))
        python = sys.executable
        anchors = str(anchor_python()) if any(c.anchor and chosen(c.name) for c in CELLS) else ""
        if args.fresh or not RAW.exists():
            record(machine())  # a new pass (else these lines join the newest pass)
        for chats in (int(c) for c in args.chats.split(",")):
            rounds = args.rounds_100k if chats >= 100_000 else args.rounds
            for round_ in range(1, rounds + 1):
                for cell in CELLS:
                    if not chosen(cell.name):
                        continue
                    if cell.max_chats is not None and chats > cell.max_chats:
                        continue
                    if round_ > (cell.runs_at_most or {}).get(chats, rounds):
                        continue
                    command = [
                        anchors if cell.anchor else python,
                        cell.script,
                        str(chats),
                        *cell.args,
                    ]
                    meta = {"part": "twostep", "cell": cell.name, "round": round_, "C": chats}
                    run(command, cwd=ANCHORS if cell.anchor else BENCH, meta=meta)
        if chosen("million"):
            meta = {"part": "million", "cell": "turbobot million, SQLite FULL, max_live 10,000"}
            run([python, "bench_million.py", str(args.million), "10000"], cwd=BENCH, meta=meta)
        if chosen("latency"):
            for channels in (100, 1000):
                for variant in ("turbobot", "bare"):
                    meta = {"part": "latency", "cell": f"latency {variant}", "channels": channels}
                    command = [
                        python,
                        "bench_latency.py",
                        str(channels),
                        str(args.latency_seconds),
                        variant,
                    ]
                    run(command, cwd=BENCH, meta=meta)
        if chosen("long"):
            for kind in ("sqlite", "memory"):
                meta = {"part": "long", "cell": f"long conversation, {kind}"}
                run([python, "bench_long.py", "10000", kind], cwd=BENCH, meta=meta)
        if chosen("workers"):
            if list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) or os.environ.get(
                "BENCH_POSTGRES_URL"
            ):
                meta = {"part": "workers", "cell": "scale-out on PostgreSQL"}
                run([python, "bench_workers.py"], cwd=BENCH, meta=meta)
            else:
                record(
                    {"part": "workers", "failed": True, "stderr": "no PostgreSQL: make postgres"}
                )
    subprocess.run([sys.executable, str(BENCH / "report.py")], check=True)


if __name__ == "__main__":
    main()
