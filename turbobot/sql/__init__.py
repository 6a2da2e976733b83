"""The SQL store (SQLAlchemy 2 async): SQLite by default, PostgreSQL to scale out."""

from turbobot.sql.store import SQLStore

__all__ = ["SQLStore"]
