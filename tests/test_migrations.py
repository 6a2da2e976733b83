"""The Alembic migrations produce exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import StoreFactory
from turbobot.sql.migrate import (
    alembic_config,
    current_revision,
    drift,
    head_revision,
    upgrade_schema,
)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
async def test_migrations_match_models_and_downgrade(store_url: str) -> None:
    engine = create_async_engine(store_url)
    try:
        async with engine.begin() as conn:
            assert await conn.run_sync(current_revision) is None
            await conn.run_sync(upgrade_schema)
            assert await conn.run_sync(current_revision) == head_revision()
            assert await conn.run_sync(drift) == []
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
            assert await conn.run_sync(current_revision) is None
            await conn.run_sync(upgrade_schema)
            assert await conn.run_sync(drift) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_postgres_schema_is_not_upgraded_silently(store_url: str) -> None:
    from turbobot import ConfigurationError
    from turbobot.sql import SQLStore

    store = SQLStore(store_url)
    with pytest.raises(ConfigurationError, match="run `turbobot db upgrade`"):
        await store.open()


async def test_make_store_fixture_is_usable(make_store: StoreFactory) -> None:
    store = await make_store()
    assert (await store.recovery()).inbox == []
