"""Alembic migrations of turbobot's schema, installed as turbobot.migrations."""
