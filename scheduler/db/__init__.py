"""Persistence: SQLModel tables, engine and sessions, and the Alembic migrations."""
