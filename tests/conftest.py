from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from fakes.discord_server import FakeDiscord
from fakes.openai_server import FakeOpenAI
from fakes.postgres import PostgresServer, find_bin_dir
from turbobot import OpenAILLM, RetryPolicy
from turbobot.store import BaseStore, InMemoryStore


@pytest.fixture
async def discord_fake() -> AsyncIterator[FakeDiscord]:
    """The fake Discord REST API and gateway on 127.0.0.1, stopped after the test."""
    async with FakeDiscord() as fake:
        yield fake


@pytest.fixture
async def openai_server() -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI().start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def fast_llm(server: FakeOpenAI, api_key: str = "test-key") -> AsyncIterator[OpenAILLM]:
    """The real OpenAI client against ``server``, with quick retries; closed after."""
    llm = OpenAILLM(
        api_key=api_key,
        base_url=server.base_url,
        timeout=5,
        retry=RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.05),
    )
    try:
        yield llm
    finally:
        await llm.aclose()


@pytest.fixture
async def openai_llm(openai_server: FakeOpenAI) -> AsyncIterator[OpenAILLM]:
    async with fast_llm(openai_server) as llm:
        yield llm


# -- databases -------------------------------------------------------------------------

StoreFactory = Callable[[], Awaitable[BaseStore]]
_db_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing; .ci/run installs them")
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()


async def _create_database(server: PostgresServer) -> str:
    import asyncpg

    name = f"turbobot_test_{os.getpid()}_{next(_db_names)}"
    conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for a fresh database of each kind ("memory" for the in-memory store)."""
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'turbobot.db'}"
    server = request.getfixturevalue("postgres")
    return await _create_database(server)


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on the same database (a new one stands for a restarted process).

    The in-memory store cannot outlive its process, so "reopening" it returns the same
    object: restart tests still check the runtime's side of recovery with it.
    """
    from turbobot.sql import SQLStore

    opened: list[BaseStore] = []
    memory = InMemoryStore()

    async def make() -> BaseStore:
        store: BaseStore = memory if store_url == "memory" else SQLStore(store_url, upgrade=True)
        await store.open()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.aclose()


# -- a disk that fills up ---------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of its own (8 MB) to fill up with :func:`fill` (needs root, as CI
    runs; the test is skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
