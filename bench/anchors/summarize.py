"""Median table (markdown) from results.jsonl lines written by the bench_*.py scripts."""

import json
import statistics
import sys
from collections import defaultdict

path = sys.argv[1] if len(sys.argv) > 1 else "results.jsonl"
cells = defaultdict(list)
order = []
with open(path) as f:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        key = (r["framework"], r["variant"], r["chats"])
        if key not in cells:
            order.append(key)
        cells[key].append(r)

order.sort(key=lambda k: (k[2], ["python-telegram-bot", "aiogram", "discord.py"].index(k[0]), k[1]))


def med(rows, field):
    vals = [r[field] for r in rows if field in r]
    return statistics.median(vals) if vals else None


print(
    "| framework | variant | C | runs | wall s (median) | msgs/s | CPU s | persist s | "
    "base RSS MB | RSS @C waiting MB | KB/waiting conv | peak RSS MB | replies ok |"
)
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for key in order:
    rows = cells[key]
    fw, var, c = key
    ps = med(rows, "persist_s")
    print(
        f"| {fw} | {var} | {c:,} | {len(rows)} | {med(rows, 'seconds'):.2f} | "
        f"{med(rows, 'msgs_per_s'):,.0f} | {med(rows, 'cpu_s'):.2f} | "
        f"{'' if ps is None else f'{ps:.2f}'} | {med(rows, 'rss_base_mb'):.0f} | "
        f"{med(rows, 'rss_waiting_mb'):.0f} | {med(rows, 'kb_per_waiting_conv'):.2f} | "
        f"{med(rows, 'peak_rss_mb'):.0f} | {all(r['replies_ok'] for r in rows)} |"
    )
