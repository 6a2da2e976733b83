"""Alembic, driven from code: upgrade the schema, report its revision, detect drift.

The migration scripts are the ``turbobot.migrations`` package, installed with turbobot
(a wheel install upgrades its own database). Functions
taking a ``Connection`` run inside ``AsyncConnection.run_sync`` so that one async
engine (aiosqlite or asyncpg) serves the app and its migrations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from turbobot.exceptions import ConfigurationError
from turbobot.sql.schema import metadata

__all__ = ["alembic_config", "check_schema", "current_revision", "drift", "upgrade_schema"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for turbobot's migrations, bound to ``connection``."""
    if not (MIGRATIONS / "env.py").is_file():
        raise ConfigurationError(
            f"turbobot's migrations are missing from {MIGRATIONS}: the installation is "
            "incomplete; reinstall turbobot"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (``None``: no schema yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(connection: Connection, revision: str = "head") -> None:
    """Create or upgrade the schema to ``revision``."""
    command.upgrade(alembic_config(connection), revision)


def check_schema(connection: Connection) -> None:
    """Fail clearly when the database's schema is not the newest one."""
    current, head = current_revision(connection), head_revision()
    if current != head:
        raise ConfigurationError(
            f"the database schema is at revision {current or 'none'}, turbobot needs {head}; "
            "run `turbobot db upgrade` with the same TURBOBOT_DATABASE_URL"
        )


def drift(connection: Connection) -> list[Any]:
    """Differences between the database's schema and the models (empty: none)."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))
