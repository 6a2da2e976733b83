"""Channel ownership on PostgreSQL for scale-out (issue 14): advisory locks against
lease rows, measured before one is built.

usage: BENCH_POSTGRES_URL=postgresql://user@host:port/db python bench/bench_leases.py

Each figure is the median of 5 rounds on an empty table:

- taking ownership of 10,000 channels, 500 a statement: ``pg_try_advisory_lock``
  (session locks) against lease rows (``INSERT ... ON CONFLICT DO UPDATE ... WHERE
  expired``, returning each lease's generation);
- renewing 10,000 leases (one ``UPDATE``; advisory locks need none while the session
  lives);
- a step commit (64 steps per transaction, as the store's group commit writes them)
  without a fence, and with the lease rows' fence: one ``SELECT ... FOR SHARE`` of the
  batch's (channel, generation) pairs in the same transaction.

What no timing shows: a session advisory lock lasts as long as its connection. A worker
frozen by SIGSTOP or a long pause keeps its TCP connection and so its locks, and no
other worker can take its channels over until the server drops the connection
(``tcp_keepalives_*``, minutes by default); nor does a lock carry a generation to fence
a late commit with. Lease rows expire on the database's clock and carry one.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

import asyncpg

CHANNELS = 10_000
BATCH = 500
STEPS = 6_400
GROUP = 64
ROUNDS = 5

SCHEMA = """
DROP TABLE IF EXISTS bench_leases, bench_steps;
CREATE TABLE bench_leases (
    channel text PRIMARY KEY,
    owner text NOT NULL,
    generation bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE TABLE bench_steps (id bigserial PRIMARY KEY, channel text NOT NULL, body text NOT NULL);
"""

TAKE = """
INSERT INTO bench_leases AS l (channel, owner, generation, expires_at)
SELECT c, $1, 1, now() + interval '30 seconds' FROM unnest($2::text[]) AS c
ON CONFLICT (channel) DO UPDATE
    SET owner = excluded.owner, generation = l.generation + 1, expires_at = excluded.expires_at
    WHERE l.expires_at < now() OR l.owner = excluded.owner
RETURNING channel, generation
"""

RENEW = """
UPDATE bench_leases SET expires_at = now() + interval '30 seconds'
WHERE owner = $1 AND expires_at > now()
"""

FENCE = """
SELECT count(*) FROM (
    SELECT 1 FROM bench_leases
    WHERE (channel, generation) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))
        AND owner = $3 AND expires_at > now()
    FOR SHARE
) AS held
"""


def channels() -> list[str]:
    return [f'["telegram", "{n}", null, null]' for n in range(CHANNELS)]


async def advisory(conn: asyncpg.Connection) -> float:
    """Seconds to take every channel's lock, ``BATCH`` channels a statement."""
    names = channels()
    started = time.perf_counter()
    for i in range(0, len(names), BATCH):
        taken = await conn.fetch(
            "SELECT pg_try_advisory_lock(hashtext(c)) FROM unnest($1::text[]) AS c",
            names[i : i + BATCH],
        )
        assert all(row[0] for row in taken)
    took = time.perf_counter() - started
    await conn.execute("SELECT pg_advisory_unlock_all()")
    return took


async def lease_rows(conn: asyncpg.Connection) -> tuple[float, float, dict[str, int]]:
    await conn.execute("TRUNCATE bench_leases")
    names = channels()
    held: dict[str, int] = {}
    started = time.perf_counter()
    for i in range(0, len(names), BATCH):
        for row in await conn.fetch(TAKE, "worker-1", names[i : i + BATCH]):
            held[row["channel"]] = row["generation"]
    took = time.perf_counter() - started
    started = time.perf_counter()
    await conn.execute(RENEW, "worker-1")
    renew = time.perf_counter() - started
    assert len(held) == CHANNELS
    return took, renew, held


async def steps(conn: asyncpg.Connection, held: dict[str, int] | None) -> float:
    """Seconds per step for STEPS steps, GROUP to a transaction, fenced if ``held``."""
    await conn.execute("TRUNCATE bench_steps")
    names = channels()
    started = time.perf_counter()
    for first in range(0, STEPS, GROUP):
        batch = [names[(first + i) % CHANNELS] for i in range(GROUP)]
        async with conn.transaction():
            if held is not None:
                fenced = await conn.fetchval(FENCE, batch, [held[c] for c in batch], "worker-1")
                assert fenced == len(set(batch))
            await conn.executemany(
                "INSERT INTO bench_steps (channel, body) VALUES ($1, $2)",
                [(c, "x" * 200) for c in batch],
            )
    return (time.perf_counter() - started) / STEPS


async def main() -> None:
    url = os.environ.get("BENCH_POSTGRES_URL")
    if not url:
        sys.exit("set BENCH_POSTGRES_URL (postgresql://user@host:port/database)")
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(SCHEMA)
        figures: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            figures.setdefault("advisory", []).append(await advisory(conn))
            took, renew, held = await lease_rows(conn)
            figures.setdefault("rows", []).append(took)
            figures.setdefault("renew", []).append(renew)
            plain = await steps(conn, None)
            fenced = await steps(conn, held)
            figures.setdefault("plain", []).append(plain)
            figures.setdefault("fenced", []).append(fenced)
            figures.setdefault("ratio", []).append(fenced / plain)
        med = {k: statistics.median(v) for k, v in figures.items()}
        per = f"{CHANNELS:,} channels, {BATCH} a statement"
        print(f"take {per}, advisory locks: {med['advisory'] * 1000:.0f} ms")
        print(f"take {per}, lease rows: {med['rows'] * 1000:.0f} ms")
        print(f"renew {CHANNELS:,} leases: {med['renew'] * 1000:.1f} ms")
        print(
            f"step commit, {GROUP} per transaction: {med['plain'] * 1e6:.1f} µs plain, "
            f"{med['fenced'] * 1e6:.1f} µs fenced (same-round ratio {med['ratio']:.2f})"
        )
        await conn.execute("DROP TABLE bench_leases, bench_steps")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
