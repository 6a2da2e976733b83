"""bench/RESULTS.md and the plots (bench/*.png) from bench/results/raw.jsonl.

usage: python bench/report.py [RAW]

Only the newest pass is reported: the lines after the last "machine" line. Medians
over rounds; ratios are taken within each round (turbobot and the anchor of the same
round) and their median reported. bench/ANALYSIS.md (written by hand: profiles, what
changed and why) is appended; bench/HISTORY.md keeps earlier sessions' figures.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OURS = "turbobot telegram, SQLite FULL"
PTB = "PTB ConversationHandler, memory"
AIOGRAM_SQLITE = "aiogram FSM, SQLite storage"
DISCORD_OURS = "turbobot discord, SQLite FULL"
DISCORD_ANCHOR = "discord.py wait_for"

Line = dict[str, Any]


def newest_pass(path: Path) -> tuple[Line, list[Line]]:
    lines = [json.loads(t) for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    starts = [i for i, line in enumerate(lines) if line.get("machine")]
    if not starts:
        sys.exit(f"{path}: no pass recorded (run bench/run_all.py)")
    return lines[starts[-1]], lines[starts[-1] + 1 :]


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return fmt(values[0], digits)
    return f"{fmt(median(values), digits)} ({fmt(min(values), digits)}–{fmt(max(values), digits)})"


def ratio(
    lines: list[Line], chats: int, ours: str, theirs: str, key: str = "msgs_per_s"
) -> tuple[float | None, list[float]]:
    """Median of the per-round ratios ours/theirs at C=chats, and the ratios."""
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for line in lines:
        if line.get("C") == chats and line.get("replies_ok") and key in line:
            by_round[line["round"]][line["cell"]] = line[key]
    ratios = [
        r[ours] / r[theirs] for r in by_round.values() if ours in r and theirs in r and r[theirs]
    ]
    return median(ratios), ratios


def twostep(lines: list[Line], out: list[str]) -> None:
    cells: dict[tuple[str, int], list[Line]] = defaultdict(list)
    order: list[str] = []
    failed = [line for line in lines if line.get("part") == "twostep" and line.get("failed")]
    for line in lines:
        if line.get("part") == "twostep" and not line.get("failed"):
            cells[(line["cell"], line["C"])].append(line)
            if line["cell"] not in order:
                order.append(line["cell"])
    sizes = sorted({c for _, c in cells})
    out.append("## The two-step workload end to end, from the same platform payloads\n")
    out.append(
        'Each of C private chats sends "hi" (the bot asks "What\'s your name?"), then its '
        'name ("Hello NAME"); every reply is checked. Telegram cells start from the '
        "anchors' update dicts, Discord cells from their MESSAGE_CREATE payloads; every "
        "framework's outgoing HTTP is answered in-process at its lowest transport layer "
        "(bench/anchors/README.md). turbobot runs its real adapters "
        "(`bench/bench_e2e.py`); the core cell hands `IncomingMessage` objects to the "
        "runtime (`bench/bench_turbobot.py`). Durable: turbobot's SQLite cells commit "
        "each message before handling it and each step before its reply leaves (WAL, "
        "synchronous=FULL); aiogram's SQLite storage commits each state change; the "
        "others keep state in RAM only.\n"
    )
    for chats in sizes:
        out.append(f"### C = {chats:,}\n")
        out.append(
            "| framework / variant | runs | msgs/s median (range) | CPU µs per message "
            "| peak RSS MB | KB per waiting conversation | vs PTB memory (same rounds) "
            "| vs aiogram SQLite (same rounds) | replies checked |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for cell in order:
            runs = cells.get((cell, chats))
            if not runs:
                continue
            rates = [r["msgs_per_s"] for r in runs]
            cpu = [1e6 * r["cpu_s"] / r["messages"] for r in runs]
            vs_ptb = ratio(lines, chats, cell, PTB)[0] if cell != PTB else None
            vs_aio = (
                ratio(lines, chats, cell, AIOGRAM_SQLITE)[0] if cell != AIOGRAM_SQLITE else None
            )
            ok = all(r["replies_ok"] for r in runs)
            out.append(
                f"| {cell} | {len(runs)} | {spread(rates)} | {fmt(median(cpu))} "
                f"| {fmt(median(r['peak_rss_mb'] for r in runs), 1)} "
                f"| {fmt(median(r['kb_per_waiting_conv'] for r in runs), 2)} "
                f"| {fmt(vs_ptb, 2, '×')} | {fmt(vs_aio, 1, '×')} | {'all' if ok else 'NO'} |"
            )
        out.append("")
    if failed:
        out.append("Cells that failed in this pass:\n")
        for line in failed:
            out.append(f"- {line.get('cell')} C={line.get('C')}: `{line.get('stderr', '')[-200:]}`")
        out.append("")

    out.append("### Against the targets\n")
    for chats in (10_000, 100_000):
        for theirs, goal in ((PTB, 2.0), (AIOGRAM_SQLITE, 10.0)):
            got, ratios = ratio(lines, chats, OURS, theirs)
            if got is None:
                out.append(
                    f"- C={chats:,}, {OURS} ≥ {goal:g}× {theirs}: not measured in this pass."
                )
                continue
            verdict = "**met**" if got >= goal else f"**missed** by {100 * (1 - got / goal):.0f}%"
            rounds = ", ".join(f"{r:.2f}×" for r in ratios)
            out.append(
                f"- C={chats:,}, {OURS} ≥ {goal:g}× {theirs}: {verdict}: {got:.2f}× "
                f"(rounds: {rounds})."
            )
    for chats in sizes:
        got, _ = ratio(lines, chats, DISCORD_OURS, DISCORD_ANCHOR)
        if got is not None:
            out.append(f"- Discord, C={chats:,}: turbobot {got:.2f}× discord.py `wait_for`.")
    grow: list[str] = []
    for cell in (DISCORD_OURS, DISCORD_ANCHOR, OURS, PTB):
        per = {
            c: median(1e6 * r["cpu_s"] / r["messages"] for r in cells[(cell, c)])
            for c in sizes
            if cells.get((cell, c))
        }
        if len(per) > 1:
            steps = " → ".join(f"{fmt(v)} µs at C={c:,}" for c, v in per.items())
            grow.append(f"  - {cell}: {steps}")
    if grow:
        out.append("- CPU per message as the number of waiting conversations grows:")
        out.extend(grow)
    out.append("")


def million(lines: list[Line], out: list[str]) -> None:
    runs = [line for line in lines if line.get("part") == "million"]
    if not runs:
        return
    out.append("## A million open conversations (`bench/bench_million.py`)\n")
    for run in runs:
        if run.get("failed"):
            out.append(f"Failed: `{run.get('stderr', '')[-300:]}`\n")
            continue
        verdict = "met" if run["peak_rss_mb"] <= 400 and run["replies_ok"] else "missed"
        cap = run["variant"].rsplit("=", 1)[-1]
        rates = (run["phase1_msgs_per_s"], run["phase2_msgs_per_s"], run["msgs_per_s"])
        rows = [
            ("conversations waiting at once", f"{run['waiting_seen']:,} (of {run['chats']:,})"),
            ("in RAM at most (`max_live`)", cap),
            ("peak RSS", f"{run['peak_rss_mb']:.0f} MB (target ≤ 400 MB: {verdict})"),
            (
                "RSS with all waiting",
                f"{run['rss_waiting_mb']:.0f} MB ({run['kb_per_waiting_conv']:.2f} KB each)",
            ),
            (
                "answered correctly when the second message came",
                f"{run['greeted']:,} (wrong: {run['wrong']})",
            ),
            (
                "msgs/s: first messages / second messages / overall",
                " / ".join(f"{r:,.0f}" for r in rates),
            ),
            ("CPU per message", f"{1e6 * run['cpu_s'] / run['messages']:.0f} µs"),
            ("database after the run", f"{run['db_bytes'] / 1e9:.2f} GB"),
        ]
        out.append("| figure | value |\n|---|---|")
        out.extend(f"| {name} | {value} |" for name, value in rows)
        out.append("")


def latency(lines: list[Line], out: list[str]) -> None:
    runs = [line for line in lines if line.get("part") == "latency" and not line.get("failed")]
    if not runs:
        return
    out.append("## Reply latency under a streaming model (`bench/bench_latency.py`)\n")
    out.append(
        "Message in → first reply byte handed to the adapter. The fake OpenAI server "
        "(its own process) streams 300 ms to the first token, then 50 tokens/s; each "
        "channel sends, waits for its whole reply, thinks 1–5 s, and sends again. "
        "*Added* is the latency minus the model's own time to its first token (as the "
        "server timed it). `bare` is the openai client alone, for comparison.\n"
    )
    out.append(
        "| variant | channels | messages | p50 ms | p99 ms | added p50 ms | added p99 ms "
        "| loop lag p50 / p99 / max ms | replies checked |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        out.append(
            f"| {run.get('variant')} | {run.get('channels')} | {run.get('messages', 0):,} "
            f"| {fmt(run.get('p50_ms'), 1)} | {fmt(run.get('p99_ms'), 1)} "
            f"| {fmt(run.get('added_p50_ms'), 2)} | {fmt(run.get('added_p99_ms'), 2)} "
            f"| {fmt(run.get('loop_lag_p50_ms'), 2)} / {fmt(run.get('loop_lag_p99_ms'), 2)} / "
            f"{fmt(run.get('loop_lag_max_ms'), 1)} | {'all' if run.get('replies_ok') else 'NO'} |"
        )
    out.append("")
    for run in runs:
        if str(run.get("variant", "")).startswith("turbobot"):
            p50, p99 = run.get("added_p50_ms"), run.get("added_p99_ms")
            if p50 is None or p99 is None:
                continue
            met = p50 <= 1 and p99 <= 10
            out.append(
                f"- {run['channels']} channels: added p50 {p50:.2f} ms (≤ 1), p99 {p99:.2f} ms "
                f"(≤ 10): {'**met**' if met else '**missed**'}."
            )
    out.append("")


def long_conversation(lines: list[Line], out: list[str]) -> None:
    runs = [line for line in lines if line.get("part") == "long" and not line.get("failed")]
    if not runs:
        return
    out.append("## One long conversation (`bench/bench_long.py 10000`)\n")
    out.append(
        "| store | turns/s at turns 9,001–10,000 | RSS per turn | rehydrate (load + replay) "
        "| replay per journal entry |"
    )
    out.append("|---|---|---|---|---|")
    for run in runs:
        rehydrate = (
            f"{run['rehydrate_load_ms']:.0f} + {run['rehydrate_replay_ms']:.0f} = "
            f"{run['rehydrate_ms']:.0f} ms"
            if "rehydrate_ms" in run
            else "—"
        )
        per_entry = f"{run['replay_us_per_entry']:.1f} µs" if "replay_us_per_entry" in run else "—"
        out.append(
            f"| {run['store']} | {run['turns_per_s_last_tenth']:,.0f} | "
            f"{run['rss_bytes_per_turn']:,} B | {rehydrate} | {per_entry} |"
        )
    out.append("")


def workers(lines: list[Line], out: list[str]) -> None:
    runs = [line for line in lines if line.get("part") == "workers"]
    if not runs:
        return
    out.append("## Scale-out on PostgreSQL (`bench/bench_workers.py`)\n")
    for run in runs:
        if run.get("failed"):
            out.append(f"Not run: `{run.get('stderr', '')[-300:]}`\n")
    import bench_workers  # its own tables, from the records it printed

    throughput = [r for r in runs if "kind" in r and "workers" in r and not r.get("failed")]
    takeovers = [r for r in runs if "lease_s" in r and not r.get("failed")]
    setup = [r for r in runs if "postgres" in r]
    if setup:
        out.append(f"PostgreSQL settings: `{json.dumps(setup[0]['postgres'])}`\n")
    if throughput:
        out.append("Two-step workload (C channels, 2C messages a run):\n")
        out.append(bench_workers.throughput_table(throughput))
        out.append("")
    if takeovers:
        out.append("Takeover after SIGKILL (worker A's channels, their second message waiting):\n")
        out.append(bench_workers.takeover_table(takeovers))
        out.append("")


def plots(lines: list[Line]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(No plots: matplotlib is not installed; `make bench` installs it.)"]
    made = []
    series: dict[str, dict[int, list[Line]]] = defaultdict(lambda: defaultdict(list))
    for line in lines:
        if line.get("part") == "twostep" and not line.get("failed") and line.get("replies_ok"):
            series[line["cell"]][line["C"]].append(line)

    def chart(
        name: str, title: str, ylabel: str, value: Callable[[Line], float], log: bool
    ) -> None:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for cell, by_c in series.items():
            xs = sorted(by_c)
            ys = [median(value(r) for r in by_c[x]) for x in xs]
            style = "-o" if cell.startswith("turbobot") else "--s"
            ax.plot(xs, ys, style, label=cell)
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("waiting conversations C")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(BENCH / name, dpi=110)
        plt.close(fig)
        made.append(f"![{title}]({name})")

    if series:
        chart(
            "plot_msgs_per_s.png",
            "Two-step workload: messages per second (median)",
            "msgs/s",
            lambda r: r["msgs_per_s"],
            True,
        )
        chart(
            "plot_rss.png",
            "Two-step workload: peak RSS (median)",
            "MB",
            lambda r: r["peak_rss_mb"],
            False,
        )
        chart(
            "plot_kb_per_conversation.png",
            "RSS per waiting conversation (median)",
            "KB",
            lambda r: r["kb_per_waiting_conv"],
            False,
        )
    runs = [line for line in lines if line.get("part") == "latency" and not line.get("failed")]
    if runs:
        fig, ax = plt.subplots(figsize=(9, 5))
        labels = [f"{r.get('variant')}\n{r.get('channels')} channels" for r in runs]
        xs = range(len(runs))
        width = 0.2
        for offset, (key, label) in enumerate(
            (
                ("p50_ms", "p50"),
                ("p99_ms", "p99"),
                ("added_p50_ms", "added p50"),
                ("added_p99_ms", "added p99"),
            )
        ):
            ax.bar(
                [x + (offset - 1.5) * width for x in xs],
                [r.get(key) or 0 for r in runs],
                width,
                label=label,
            )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title("Message in → first reply byte (model: 300 ms to first token, 50 tokens/s)")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(BENCH / "plot_latency.png", dpi=110)
        plt.close(fig)
        made.append("![latency](plot_latency.png)")
    return made


def main() -> None:
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH / "results" / "raw.jsonl"
    info, lines = newest_pass(raw)
    out = ["# Benchmark results", ""]
    out.append(
        "Written by `make bench` (`bench/run_all.py`, then `bench/report.py`) from "
        "`bench/results/raw.jsonl`; every figure below comes from that one pass. "
        "Earlier sessions' figures and notes: `bench/HISTORY.md`.\n"
    )
    out.append("| machine | |\n|---|---|")
    for key in (
        "when",
        "cpu",
        "cores",
        "ram_gb",
        "kernel",
        "python",
        "sqlite",
        "turbobot_commit",
        "command",
    ):
        out.append(f"| {key} | {info.get(key)} |")
    for name, version in info.get("versions", {}).items():
        out.append(f"| {name} | {version} |")
    out.append("")
    twostep(lines, out)
    million(lines, out)
    latency(lines, out)
    long_conversation(lines, out)
    workers(lines, out)
    made = plots(lines)
    if made:
        out.append("## Plots\n")
        out.extend(f"{m}\n" for m in made)
    analysis = BENCH / "ANALYSIS.md"
    if analysis.exists():
        out.append(analysis.read_text(encoding="utf-8"))
    (BENCH / "RESULTS.md").write_text("\n".join(out).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {BENCH / 'RESULTS.md'} and {len(made)} plots", file=sys.stderr)


if __name__ == "__main__":
    main()
