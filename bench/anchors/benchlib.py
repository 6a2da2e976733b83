"""Shared measurement helpers for the two-step-conversation baseline benchmarks.

Every framework script: builds its inputs (plain dicts, as they would arrive from the
network) *before* timing starts, then feeds all C first messages, then all C second
messages, and verifies that exactly 2*C replies with the right text were "sent" through
an in-process stub transport.
"""

import json
import os
import resource
import sys
import time

ASK_TEXT = "What's your name?"
BASE_ID = 10_000_000  # chat id == user id == BASE_ID + i (private chats)


def name_for(i: int) -> str:
    return f"name{i}"


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def parse_chats(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(f"usage: {sys.argv[0]} CHATS [variant]")
    return int(argv[0])


class ReplyLog:
    """Records every outgoing message that the stub transport receives."""

    def __init__(self):
        self.sent = []  # (chat_id, text)

    def record(self, chat_id: int, text: str) -> None:
        self.sent.append((int(chat_id), text))

    def reset(self) -> None:
        self.sent = []

    def verify(self, chats: int) -> bool:
        if len(self.sent) != 2 * chats:
            print(f"replies: expected {2 * chats}, got {len(self.sent)}", file=sys.stderr)
            return False
        want = {}
        for i in range(chats):
            want[(BASE_ID + i, ASK_TEXT)] = 1
            want[(BASE_ID + i, f"Hello {name_for(i)}")] = 1
        got = {}
        for key in self.sent:
            got[key] = got.get(key, 0) + 1
        if got != want:
            bad = [k for k in set(got) | set(want) if got.get(k) != want.get(k)][:5]
            print(f"reply mismatch, e.g. {bad}", file=sys.stderr)
            return False
        return True


# Warm-up: this many extra two-step conversations (chat ids BASE_ID-1 .. BASE_ID-WARMUP)
# are run to completion before timing starts, so lazy imports / first-call caches are not
# billed to the measured workload. Their replies are discarded before verification.
WARMUP = 50
WARMUP_IDS = range(-WARMUP, 0)


class Timer:
    """Wall clock (perf_counter) and process CPU time (process_time) marks."""

    def __init__(self):
        self.marks = {}
        self.cpu_marks = {}
        self.t0 = None
        self.c0 = None

    def start(self):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def mark(self, name):
        self.marks[name] = time.perf_counter() - self.t0
        self.cpu_marks[name] = time.process_time() - self.c0


def emit(framework, variant, chats, seconds, replies_ok, rss_base, rss_waiting, cpu_s, **extra):
    out = {
        "framework": framework,
        "variant": variant,
        "chats": chats,
        "messages": 2 * chats,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(2 * chats / seconds, 1),
        "cpu_s": round(cpu_s, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_base_mb": round(rss_base, 1),
        "rss_waiting_mb": round(rss_waiting, 1),
        "kb_per_waiting_conv": round((rss_waiting - rss_base) * 1024.0 / chats, 2),
        "replies_ok": bool(replies_ok),
    }
    for k, v in extra.items():
        out[k] = round(v, 4) if isinstance(v, float) else v
    print(json.dumps(out), flush=True)
    return out


def fresh_path(name: str) -> str:
    """A path in a scratch folder (BENCH_TMP or the system temp dir) that does not exist yet."""
    import tempfile

    d = os.environ.get("BENCH_TMP") or os.path.join(tempfile.gettempdir(), "bench-anchors")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, f"{name}.{os.getpid()}")
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            os.remove(p + suffix)
        except FileNotFoundError:
            pass
    return p
