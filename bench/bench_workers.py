"""Scale-out on PostgreSQL: the two-step workload on 1, 2 and 4 worker processes, and
how long the channels of a SIGKILLed worker wait for another worker.

usage: python bench/bench_workers.py [--chats 2000] [--lease-chats 500] [--rounds 3]
           [--workers 1,2,4] [--takeover-runs 3] [--takeover-channels 200] [--leases 2,10]
           [--only throughput|takeover] [--pg-fsync on|off] [--keep]

PostgreSQL: ``BENCH_POSTGRES_URL`` (``postgresql+asyncpg://user@host:port/db``, a user
allowed to create databases: every run gets a fresh one, dropped after). Unset, the
bench starts a throwaway server of its own with the helper of the test suite
(``fakes.postgres``), durable (``fsync=on``, ``full_page_writes=on``,
``synchronous_commit=on``) unless ``--pg-fsync off`` (the test suite's settings).
Each worker logs to a file (turbobot's loggers at ``BENCH_LOG_LEVEL``, default INFO);
the lines of level INFO and above are summed up at the end (``--keep`` keeps the files).

The workload is bench/bench_turbobot.py's: each of C private channels sends "hi"
(the bot asks "What's your name?"), then, once every channel was asked, its name (the
bot answers "Hello NAME" and the template ends); every reply is checked (each channel
exactly its two, once). Messages go through ``Runtime.receive_many``, 100 at a time.

1. Throughput. N worker processes (multiprocessing, spawn), each with its own
   ``SQLStore(url, worker=f"w{i}", lease_seconds=10)`` and ``Runtime``, all running at
   once; the messages are dealt round-robin: message i of the stream to worker i % N.
   The stream is the C "hi" messages then the C names, so where a channel's name goes
   depends on C modulo N; both cases are measured:

   - ``sticky``: both messages of channel c to worker c % N (round-robin when C is a
     multiple of N, e.g. the default 500): each worker is sent both messages of its
     channels (another worker may still take a channel first: the NOTIFY of the
     receiving worker's commit races its own take; "answered by another worker" shows
     how often);
   - ``alternating``: "hi" to worker c % N, the name to worker (c + 1) % N (round-robin
     when C ≡ 1 mod N): every second message reaches a worker that does not hold its
     channel, which commits it and announces it (NOTIFY); the holder processes it.

   Runs with leases use ``--lease-chats`` channels (default 500): they cost about
   10 ms per new channel here, so 2,000 channels would take minutes per round.

   Timed from the start signal until the parent has counted all 2C replies (each
   worker counts the replies its sender sent in shared memory). Also per message:
   worker CPU, PostgreSQL server CPU (own server only: its processes' /proc times),
   and the database transactions and round trips of the workers, counted in each
   worker by SQLAlchemy events (commits, rollbacks = read transactions, statements;
   round trips ≈ statements + BEGIN and COMMIT/ROLLBACK per transaction; the LISTEN
   connection's notifications are not counted). Same run: the single process on
   PostgreSQL without leases (``worker=None``) and on a SQLite file (WAL,
   ``synchronous=FULL``, what bench_turbobot's ``sqlite`` variant runs).

2. Takeover. Workers A and B (``lease_seconds`` L, real expiry, nothing faked). A
   receives "hi" for K channels and answers them (so it holds their leases), waits
   a random time in [0, L/3) (a random point of its renewal cycle), receives the K
   names in one ``receive_many`` (committed and announced) and SIGKILLs itself as soon
   as that returns, before any of them is processed. Measured: from the kill until B
   sent its first and its last (K-th) "Hello NAME". B learns of the channels by its own
   ``check_leases``, every L/3; the NOTIFY of A's commit reaches B while A's leases
   still hold.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "anchors"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib as B
from bench_turbobot import message, twostep

from turbobot import ChannelKey, IncomingMessage, ScriptedLLM
from turbobot.runtime import BaseSender, Runtime, RuntimeSettings

BATCH = 100
WARMUP = 50
LEASE_SECONDS = 10.0
#: seconds a run may wait for its replies before it is reported as stalled
STALL_AFTER = 120.0
POLL = 0.002


def hi(chats: int, c: int) -> IncomingMessage:
    return message(c, c + 1, "hi")


def name(chats: int, c: int) -> IncomingMessage:
    return message(c, chats + c + 1, B.name_for(c))


def owner(c: int, phase: int, workers: int, delivery: str) -> int:
    """The worker that receives channel ``c``'s message of ``phase`` (0 "hi", 1 the name)."""
    return (c + (phase if delivery == "alternating" else 0)) % workers


# -- in the worker processes -------------------------------------------------------------


class CountingSender(BaseSender):
    """Records every reply; counts them (or, with ``only``, those starting with it) in
    this worker's slot of a shared array."""

    def __init__(self, replies: Any, slot: int, only: str = "") -> None:
        self.replies = replies
        self.slot = slot
        self.only = only
        self.sent: list[tuple[int, str]] = []
        self.first: float | None = None
        self.last: float | None = None

    async def send(self, key: ChannelKey, text: str) -> str | None:
        now = time.monotonic()
        self.sent.append((int(key.channel) - B.BASE_ID, text))
        if text.startswith(self.only):
            self.first = self.first or now
            self.last = now
            self.replies[self.slot] += 1
        return str(len(self.sent))


class Trips:
    """The database work of one store, counted by SQLAlchemy's events."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.counts = {"statements": 0, "commits": 0, "rollbacks": 0}
        sync = engine.sync_engine
        event.listen(sync, "before_cursor_execute", self._statement)
        event.listen(sync, "commit", self._commit)
        event.listen(sync, "rollback", self._rollback)

    def _statement(self, *_: Any) -> None:
        self.counts["statements"] += 1

    def _commit(self, *_: Any) -> None:
        self.counts["commits"] += 1

    def _rollback(self, *_: Any) -> None:
        self.counts["rollbacks"] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)


def _log_to(path: str) -> None:
    logging.basicConfig(
        filename=path,
        level=logging.WARNING,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("turbobot").setLevel(os.environ.get("BENCH_LOG_LEVEL", "INFO"))


async def _wait(event: Any) -> None:
    """Wait for a multiprocessing event without stopping this process's event loop."""
    while not event.is_set():
        await asyncio.to_thread(event.wait, 0.5)


async def _feed(
    runtime: Runtime, channels: Sequence[int], make: Callable[[int], IncomingMessage]
) -> None:
    for start in range(0, len(channels), BATCH):
        accepted = await runtime.receive_many([make(c) for c in channels[start : start + BATCH]])
        if not all(accepted):
            logging.getLogger("bench").error("%d messages refused", accepted.count(False))


async def _open(
    spec: dict[str, Any], replies: Any, only: str = ""
) -> tuple[Any, Runtime, CountingSender]:
    from turbobot.sql import SQLStore

    if spec["kind"] == "sqlite":
        store = SQLStore(spec["url"], sqlite_synchronous="FULL")
    elif spec["kind"] == "postgres":
        store = SQLStore(spec["url"])
    else:
        store = SQLStore(spec["url"], worker=f"w{spec['index']}", lease_seconds=spec["lease"])
    await store.open()
    sender = CountingSender(replies, spec["index"], only)
    settings = RuntimeSettings(idle_evict_seconds=None, gc_threshold=10_000)
    runtime = Runtime(twostep, llm=ScriptedLLM(), sender=sender, store=store, settings=settings)
    await runtime.start()
    return store, runtime, sender


async def _throughput_worker(spec: dict[str, Any], ctl: dict[str, Any]) -> dict[str, Any]:
    index, workers, chats = spec["index"], spec["workers"], spec["chats"]
    store, runtime, sender = await _open(spec, ctl["replies"])
    trips = Trips(store.engine) if spec["kind"] != "sqlite" else None
    # Warm-up: channels below the workload's, both messages received here (another
    # worker may answer them: the parent waits for all warm-up replies of all workers).
    warm = [-(index * WARMUP + j) - 1 for j in range(WARMUP)]
    await _feed(runtime, warm, lambda c: message(c, 10**9 + c, "hi"))
    await runtime.join()
    await _feed(runtime, warm, lambda c: message(c, 2 * 10**9 + c, B.name_for(c)))
    await runtime.join()
    await store.flush()
    shares = [
        [c for c in range(chats) if owner(c, phase, workers, spec["delivery"]) == index]
        for phase in (0, 1)
    ]
    ctl["ready"].put(index)

    await _wait(ctl["go1"])  # (the parent zeroed the reply counters)
    warmup, sender.sent = sender.sent, []
    cpu = time.process_time()
    before = trips.snapshot() if trips else {}
    await _feed(runtime, shares[0], lambda c: hi(chats, c))
    await _wait(ctl["go2"])
    await _feed(runtime, shares[1], lambda c: name(chats, c))
    await _wait(ctl["done"])
    cpu = time.process_time() - cpu
    after = trips.snapshot() if trips else {}
    await runtime.aclose()
    await store.aclose()
    return {
        "index": index,
        "sent": sender.sent,
        "cpu_s": cpu,
        "trips": {k: after[k] - before[k] for k in after},
        "received": [len(s) for s in shares],
        "warmup": warmup,
    }


async def _takeover_worker(spec: dict[str, Any], ctl: dict[str, Any]) -> dict[str, Any]:
    chats = spec["chats"]
    store, runtime, sender = await _open(spec, ctl["replies"], only="Hello ")
    ctl["ready"].put(spec["index"])
    if spec["index"] == 0:  # A: answers the "hi"s, takes the names in, dies
        await _wait(ctl["go1"])
        await _feed(runtime, range(chats), lambda c: hi(chats, c))
        await runtime.join()
        await store.flush()  # the replies' sent marks too: nothing left for B to resend
        ctl["ready"].put(len(sender.sent))
        await _wait(ctl["go2"])  # (B started meanwhile)
        await runtime.receive_many([name(chats, c) for c in range(chats)])
        # Committed and announced; no channel has run a step since (no await since).
        ctl["killed_at"].value = time.monotonic()
        os.kill(os.getpid(), signal.SIGKILL)
    await _wait(ctl["done"])
    await runtime.aclose()
    await store.aclose()
    return {"index": spec["index"], "sent": sender.sent, "first": sender.first, "last": sender.last}


def worker_main(role: str, spec: dict[str, Any], ctl: dict[str, Any]) -> None:
    _log_to(spec["log"])
    run = _throughput_worker if role == "throughput" else _takeover_worker
    try:
        result = asyncio.run(run(spec, ctl))
    except BaseException as exc:
        logging.getLogger("bench").exception("worker %s failed", spec["index"])
        ctl["results"].put({"index": spec["index"], "error": repr(exc)[:400]})
        raise
    ctl["results"].put(result)


# -- PostgreSQL, from the parent ------------------------------------------------------------


def _asyncpg_dsn(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, database: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


async def _sql(url: str, statement: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


def sql(url: str, statement: str, *args: Any) -> list[Any]:
    return asyncio.run(_sql(url, statement, *args))


class Postgres:
    """The database server: BENCH_POSTGRES_URL's, or a throwaway one started here."""

    def __init__(self, fsync: bool) -> None:
        self.server: Any = None
        self.url = os.environ.get("BENCH_POSTGRES_URL", "")
        if not self.url:
            self.server = _start_postgres(fsync)
            self.url = self.server.url("postgres")
        self.names = (f"bench_workers_{os.getpid()}_{n}" for n in range(1, 10**6))
        self.template = f"bench_workers_{os.getpid()}_schema"
        sql(self.url, f'CREATE DATABASE "{self.template}"')
        asyncio.run(_upgrade(_with_database(self.url, self.template)))

    def settings(self) -> dict[str, str]:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        return {n: sql(self.url, f"SHOW {n}")[0][0] for n in names}

    def fresh(self) -> tuple[str, str]:
        database = next(self.names)
        sql(self.url, f'CREATE DATABASE "{database}" TEMPLATE "{self.template}"')
        return database, _with_database(self.url, database)

    def drop(self, database: str) -> None:
        sql(self.url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    def cpu(self) -> float | None:
        """CPU seconds used by the server's processes so far (own server only)."""
        if self.server is None:
            return None
        postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            # after the name: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
            if int(entry) == postmaster:
                total += sum(int(f) for f in fields[11:15])  # reaped backends too
            elif int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        try:
            sql(self.url, f'DROP DATABASE IF EXISTS "{self.template}"')
        finally:
            if self.server is not None:
                self.server.stop()


async def _upgrade(url: str) -> None:
    from turbobot.sql import SQLStore

    async with SQLStore(url, upgrade=True):
        pass


def _start_postgres(fsync: bool) -> Any:
    from fakes.postgres import PostgresServer, find_bin_dir

    class DurablePostgres(PostgresServer):
        """The test suite's throwaway server, with PostgreSQL's durable defaults."""

        def start(self) -> DurablePostgres:
            if self._as_postgres:
                shutil.chown(self.dir, "postgres")
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust")
            options = (
                f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=200"
            )
            log = str(self.dir / "log")
            self._run("pg_ctl", "-D", str(self.data), "-w", "-l", log, "-o", options, "start")
            return self

    bin_dir = find_bin_dir()
    if bin_dir is None:
        sys.exit("PostgreSQL server binaries are missing (apt-get install postgresql)")
    return (DurablePostgres if fsync else PostgresServer)(bin_dir).start()


# -- the parent's side of a run ----------------------------------------------------------------


class Crew:
    """Worker processes of one run, and what they share with the parent."""

    def __init__(self, role: str, specs: list[dict[str, Any]], start: bool = True) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ctl = {
            "go1": ctx.Event(),
            "go2": ctx.Event(),
            "done": ctx.Event(),
            "ready": ctx.Queue(),
            "results": ctx.Queue(),
            "replies": ctx.Array("q", len(specs), lock=False),
            "killed_at": ctx.Value("d", 0.0, lock=False),
        }
        self.procs = [
            ctx.Process(target=worker_main, args=(role, spec, self.ctl), daemon=True)
            for spec in specs
        ]
        if start:
            for proc in self.procs:
                proc.start()

    def replies(self) -> int:
        return sum(self.ctl["replies"][:])

    def get(self, queue: str, timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ctl[queue].get(timeout=0.2)
            except Exception:  # queue.Empty
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {queue} message in {timeout:.0f}s") from None
                if queue == "ready" and any(p.exitcode not in (None, -9) for p in self.procs):
                    # (a process not started yet has no exit code either)
                    raise RuntimeError("a worker process died before it was ready") from None

    def wait_replies(self, target: int, timeout: float = STALL_AFTER) -> bool:
        deadline = time.monotonic() + timeout
        while self.replies() < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True

    def abort(self) -> list[dict[str, Any]]:
        """A worker died before the start: stop the others; what the dead one said."""
        for proc in self.procs:
            if proc.pid is not None and proc.is_alive():
                proc.kill()
            if proc.pid is not None:
                proc.join()
        results = []
        while True:
            try:
                results.append(self.ctl["results"].get(timeout=1.0))
            except Exception:  # queue.Empty
                return results

    def finish(self, expected: int) -> list[dict[str, Any]]:
        self.ctl["done"].set()
        results = []
        for _ in range(expected):
            try:
                results.append(self.get("results", 120.0))
            except TimeoutError:
                break
        for proc in self.procs:
            if proc.pid is None:
                continue  # never started
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return sorted(results, key=lambda r: r["index"])


def verify(
    sent: list[tuple[int, str]], channels: range, hello_only: bool = False
) -> dict[str, int]:
    """Each channel's replies against what it should get, exactly once each."""
    want: collections.Counter[tuple[int, str]] = collections.Counter()
    for c in channels:
        if not hello_only:
            want[(c, B.ASK_TEXT)] = 1
        want[(c, f"Hello {B.name_for(c)}")] = 1
    got = collections.Counter(sent)
    return {
        "missing": sum(max(0, n - got[k]) for k, n in want.items()),
        "duplicates": sum(max(0, n - want[k]) for k, n in got.items() if k in want),
        "unexpected": sum(n for k, n in got.items() if k not in want),
    }


def db_state(kind: str, url: str) -> dict[str, int]:
    queries = {
        "unsent": "SELECT count(*) FROM outbox WHERE NOT sent",
        "unconsumed": "SELECT count(*) FROM inbox WHERE NOT consumed",
        "active": "SELECT count(*) FROM conversations WHERE status IN ('running', 'waiting')",
        "channels_without_2_replies": (
            "SELECT count(*) FROM (SELECT channel FROM outbox GROUP BY channel "
            "HAVING count(*) <> 2) AS c"
        ),
    }
    if kind == "sqlite":
        path = url.split("///", 1)[1]
        with sqlite3.connect(path) as conn:
            return {k: conn.execute(q).fetchone()[0] for k, q in queries.items()}
    return {k: int(sql(url, q)[0][0]) for k, q in queries.items()}


_NOISE = re.compile(r"\[[^\]]*\]|ChannelKey\([^)]*\)|\d+(\.\d+)?")


def scan_logs(paths: Sequence[Path]) -> dict[str, int]:
    """Lines of level INFO and above, by message with the numbers and channels blanked."""
    found: collections.Counter[str] = collections.Counter()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 4)
            if len(parts) == 5 and parts[3] in ("INFO", "WARNING", "ERROR", "CRITICAL"):
                found[f"{parts[3]} {_NOISE.sub('#', parts[4])[:160]}"] += 1
            elif line.startswith("Traceback"):
                found["Traceback"] += 1
    return dict(found)


def throughput_run(
    pg: Postgres | None,
    kind: str,
    workers: int,
    delivery: str,
    chats: int,
    workdir: Path,
    tag: str,
) -> dict[str, Any]:
    database = None
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{workdir / f'{tag}.db'}"
    else:
        assert pg is not None
        database, url = pg.fresh()
    logs = [workdir / f"{tag}-w{i}.log" for i in range(workers)]
    specs = [
        {
            "index": i,
            "workers": workers,
            "chats": chats,
            "delivery": delivery,
            "kind": kind,
            "url": url,
            "lease": LEASE_SECONDS,
            "log": str(logs[i]),
        }
        for i in range(workers)
    ]
    crew = Crew("throughput", specs)
    try:
        for _ in range(workers):
            crew.get("ready")
    except (RuntimeError, TimeoutError) as exc:
        return failed_run(
            crew,
            exc,
            url,
            logs,
            pg,
            database,
            kind=kind,
            workers=workers,
            delivery=delivery,
            chats=chats,
        )
    warmed = crew.wait_replies(2 * WARMUP * workers, timeout=60)
    time.sleep(0.2)  # (a warm-up reply sent twice would show in the counts)
    warmup_replies = crew.replies()
    crew.ctl["replies"][:] = [0] * workers
    cpu0 = pg.cpu() if pg is not None and kind != "sqlite" else None
    crew.ctl["go1"].set()
    started = time.perf_counter()
    ok = crew.wait_replies(chats)
    phase1 = time.perf_counter() - started
    crew.ctl["go2"].set()
    ok = ok and crew.wait_replies(2 * chats)
    seconds = time.perf_counter() - started
    cpu1 = pg.cpu() if cpu0 is not None and pg is not None else None
    replies_seen = crew.replies()
    results = crew.finish(workers)
    sent = [reply for r in results for reply in r.get("sent", ())]
    messages = 2 * chats
    trips: collections.Counter[str] = collections.Counter()
    for r in results:
        trips.update(r.get("trips", {}))
    # replies sent by a worker other than the one that received the message answered
    elsewhere = sum(
        owner(c, 0 if text == B.ASK_TEXT else 1, workers, delivery) != r["index"]
        for r in results
        for c, text in r.get("sent", ())
        if c >= 0
    )
    out: dict[str, Any] = {
        "kind": kind,
        "workers": workers,
        "delivery": delivery,
        "chats": chats,
        "completed": ok,
        "seconds": round(seconds, 3),
        "phase1_s": round(phase1, 3),
        "phase1_msgs_per_s": round(chats / phase1, 1) if ok else None,
        "phase2_msgs_per_s": round(chats / (seconds - phase1), 1) if ok else None,
        "msgs_per_s": round(messages / seconds, 1) if ok else None,
        "replies_seen": replies_seen,
        "per_worker_replies": [len(r.get("sent", ())) for r in results],
        "answered_by_another_worker": round(elsewhere / messages, 4),
        "worker_cpu_ms_per_msg": round(
            1000 * sum(r.get("cpu_s", 0.0) for r in results) / messages, 3
        ),
        "errors": [r["error"] for r in results if "error" in r],
        "warmup_wrong": (not warmed) + abs(warmup_replies - 2 * WARMUP * workers),
        "warmup_check": verify(
            [reply for r in results for reply in r.get("warmup", ())],
            range(-WARMUP * workers, 0),
        ),
        **verify(sent, range(chats)),
    }
    if cpu0 is not None and cpu1 is not None:
        out["server_cpu_ms_per_msg"] = round(1000 * (cpu1 - cpu0) / messages, 3)
    if trips:
        transactions = trips["commits"] + trips["rollbacks"]
        out["commits_per_msg"] = round(trips["commits"] / messages, 3)
        out["reads_per_msg"] = round(trips["rollbacks"] / messages, 3)
        out["statements_per_msg"] = round(trips["statements"] / messages, 3)
        out["round_trips_per_msg"] = round((trips["statements"] + 2 * transactions) / messages, 3)
    out["db"] = db_state(kind, url)
    out["logs"] = scan_logs(logs)
    if database is not None and pg is not None:
        pg.drop(database)
    return out


def failed_run(
    crew: Crew,
    exc: BaseException,
    url: str,
    logs: list[Path],
    pg: Postgres | None,
    database: str | None,
    **what: Any,
) -> dict[str, Any]:
    """The record of a run whose workers did not all start (the others are stopped)."""
    said = crew.abort()
    out: dict[str, Any] = {
        **what,
        "completed": False,
        "msgs_per_s": None,
        "all_answered_s": None,
        "errors": [str(exc)] + [r["error"] for r in said if "error" in r],
        "db": {},
        "logs": scan_logs(logs),
    }
    if database is not None and pg is not None:
        pg.drop(database)
    return out


def takeover_run(
    pg: Postgres, lease: float, chats: int, workdir: Path, tag: str, rng: random.Random
) -> dict[str, Any]:
    database, url = pg.fresh()
    logs = [workdir / f"{tag}-{role}.log" for role in ("A", "B")]
    specs = [
        {"index": i, "chats": chats, "kind": "leases", "url": url, "lease": lease, "log": str(log)}
        for i, log in enumerate(logs)
    ]
    crew = Crew("takeover", specs, start=False)
    try:
        crew.procs[0].start()
        crew.get("ready")
        crew.ctl["go1"].set()
        asked = crew.get("ready")
        # B starts once A holds the channels (else B takes some of them as they arrive)
        crew.procs[1].start()
        crew.get("ready")
    except (RuntimeError, TimeoutError) as exc:
        return failed_run(crew, exc, url, logs, pg, database, lease_s=lease, channels=chats)
    held = sql(url, "SELECT count(*) FROM leases WHERE worker = 'w0' AND expires_at > now()")
    pause = rng.uniform(0, lease / 3)
    time.sleep(pause)
    crew.ctl["go2"].set()
    victim = crew.procs[0]
    victim.join(60)
    left = sql(
        url,
        "SELECT EXTRACT(EPOCH FROM max(expires_at) - now()) FROM leases WHERE worker = 'w0'",
    )[0][0]
    ok = crew.wait_replies(chats, timeout=3 * lease + STALL_AFTER)
    seen = time.monotonic()
    killed_at = crew.ctl["killed_at"].value
    results = crew.finish(1)
    b = next((r for r in results if r["index"] == 1), {})
    out: dict[str, Any] = {
        "lease_s": lease,
        "channels": chats,
        "asked_by_A": asked,
        "leases_held_by_A": int(held[0][0]),
        "A_exitcode": victim.exitcode,
        "pause_s": round(pause, 3),
        "lease_left_at_kill_s": round(float(left), 3) if left is not None else None,
        "completed": ok,
        "first_reply_s": round(b["first"] - killed_at, 3) if b.get("first") else None,
        "all_answered_s": round(b["last"] - killed_at, 3) if ok and b.get("last") else None,
        "parent_saw_all_s": round(seen - killed_at, 3) if ok else None,
        "errors": [r["error"] for r in results if "error" in r],
        **verify(b.get("sent", []), range(chats), hello_only=True),
        "db": db_state("leases", url),
        "logs": scan_logs(logs),
    }
    pg.drop(database)
    return out


# -- the report -----------------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


LABELS = {
    "sqlite": "SQLite file, WAL, synchronous=FULL",
    "postgres": "PostgreSQL, no leases (worker=None)",
    "leases": "PostgreSQL, leases (worker=wN, 10 s)",
}


def problems(group: list[dict[str, Any]]) -> str:
    """What went wrong in a group of runs ("all exact" when nothing did)."""
    totals: collections.Counter[str] = collections.Counter()
    for run in group:
        totals["stalled"] += not run["completed"]
        for field in ("missing", "duplicates", "unexpected", "warmup_wrong"):
            totals[field] += run.get(field, 0)
        for field, n in run.get("warmup_check", {}).items():
            totals[f"warm-up {field}"] += n
        totals["errors"] += len(run["errors"])
        for field, value in run["db"].items():
            totals[f"db {field}"] += value
    found = [f"{n} {field}" for field, n in totals.items() if n]
    return "; ".join(found) if found else "all exact"


def throughput_table(runs: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["kind"], run["workers"], run["delivery"]), []).append(run)
    lines = [
        '| store | processes | delivery | C | msgs/s median | rounds | "hi" / names '
        "msgs/s | answered by another worker | worker CPU ms/msg | server CPU ms/msg "
        "| commits/msg | read txns/msg | round trips/msg ≈ | replies |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, workers, delivery), group in groups.items():
        rates = [r["msgs_per_s"] for r in group]

        def med(field: str, g: list[dict[str, Any]] = group) -> float | None:
            return _median([r.get(field) for r in g])

        check = problems(group)
        lines.append(
            f"| {LABELS[kind]} | {workers} | {delivery if workers > 1 else '—'} "
            f"| {group[0]['chats']:,} "
            f"| {_fmt(_median(rates))} | {' / '.join(_fmt(r) for r in rates)} "
            f"| {_fmt(med('phase1_msgs_per_s'))} / {_fmt(med('phase2_msgs_per_s'))} "
            f"| {_fmt(100 * (med('answered_by_another_worker') or 0), 0)}% "
            f"| {_fmt(med('worker_cpu_ms_per_msg'), 3)} | {_fmt(med('server_cpu_ms_per_msg'), 3)} "
            f"| {_fmt(med('commits_per_msg'), 2)} | {_fmt(med('reads_per_msg'), 2)} "
            f"| {_fmt(med('round_trips_per_msg'), 1)} | {check} |"
        )
    return "\n".join(lines)


def takeover_table(runs: list[dict[str, Any]]) -> str:
    groups: dict[float, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["lease_s"], []).append(run)
    lines = [
        "| lease s | channels | runs | A's leases at kill, median | lease left at kill, median "
        "| kill → B's first reply, median | kill → all answered: median (min–max) | replies |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lease, group in groups.items():
        done = [r["all_answered_s"] for r in group if r.get("all_answered_s") is not None]
        check = problems(group)
        spread = f" ({min(done):.2f}–{max(done):.2f})" if done else ""
        lines.append(
            f"| {lease:g} | {group[0]['channels']} | {len(group)} "
            f"| {_fmt(_median([r.get('leases_held_by_A') for r in group]))} "
            f"| {_fmt(_median([r.get('lease_left_at_kill_s') for r in group]), 2)} s "
            f"| {_fmt(_median([r.get('first_reply_s') for r in group]), 2)} s "
            f"| {_fmt(_median(done), 2)} s{spread} | {check} |"
        )
    return "\n".join(lines)


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chats", type=int, default=2000, help="without leases")
    parser.add_argument(
        "--lease-chats", type=int, default=500, help="with leases (~10 ms a new channel)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--takeover-runs", type=int, default=3)
    parser.add_argument("--takeover-channels", type=int, default=200)
    parser.add_argument("--leases", default="2,10")
    parser.add_argument("--only", choices=("throughput", "takeover"))
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on")
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    pg = Postgres(args.pg_fsync == "on")
    throughput: list[dict[str, Any]] = []
    takeovers: list[dict[str, Any]] = []
    try:
        _emit({"postgres": pg.settings(), "own_server": pg.server is not None})
        if args.only != "takeover":
            configs = [("sqlite", 1, "sticky"), ("postgres", 1, "sticky")]
            for n in (int(w) for w in args.workers.split(",")):
                configs += [("leases", n, d) for d in ("sticky", "alternating")[: min(n, 2)]]
            for round_ in range(args.rounds):
                for kind, n, delivery in configs:
                    tag = f"r{round_}-{kind}-{n}-{delivery}"
                    chats = args.lease_chats if kind == "leases" else args.chats
                    run = throughput_run(pg, kind, n, delivery, chats, workdir, tag)
                    _emit({"round": round_, **run})
                    throughput.append(run)
        if args.only != "throughput":
            rng = random.Random(14)
            for lease in (float(s) for s in args.leases.split(",")):
                for n in range(args.takeover_runs):
                    tag = f"takeover-{lease:g}-{n}"
                    run = takeover_run(pg, lease, args.takeover_channels, workdir, tag, rng)
                    _emit(run)
                    takeovers.append(run)
    finally:
        pg.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    if throughput:
        print("Two-step workload (C channels, 2C messages a run):\n")
        print(throughput_table(throughput))
        print()
    if takeovers:
        print("Takeover after SIGKILL (worker A's channels, their second message waiting):\n")
        print(takeover_table(takeovers))
    noted: collections.Counter[str] = collections.Counter()
    for run in throughput + takeovers:
        noted.update(run["logs"])
    if noted:
        print("\nLog lines of the workers (INFO and above, numbers blanked), all runs:")
        for line, count in noted.most_common():
            print(f"  {count:6d}  {line}")


if __name__ == "__main__":
    main()
