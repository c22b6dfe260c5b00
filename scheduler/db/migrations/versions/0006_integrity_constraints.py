"""integrity constraints (one open allocation per GPU, no overlapping usage)

What the application promises, the database now refuses to break, whatever writes to it:

- **One holder per GPU.** An allocation holds its GPUs until its ``released_at`` is set
  (the site confirmed the workers gone). The hold is copied onto ``allocation_gpu`` (a new
  ``released_at`` column, written in the same transaction as the allocation's, backfilled
  here), and the partial unique index ``ux_allocation_gpu_held`` on
  ``allocation_gpu (gpu_id) WHERE released_at IS NULL`` lets one row at a time hold a GPU.
- **No overlapping usage on one GPU.** On PostgreSQL the exclusion constraint
  ``ex_usage_gpu_time`` (``gpu_id WITH =, int8range(start_s, end_s) WITH &&``, GiST, needs
  the ``btree_gist`` extension); on SQLite the trigger ``usage_interval_no_overlap`` refuses
  an insert that overlaps the row of the same GPU that starts last before the new row ends
  (found through the new index ``ix_usage_gpu_start``; the rows already there do not
  overlap, so that one row is the only candidate). Rows are half-open ``[start_s, end_s)``:
  one that starts where another ends does not overlap it.

``btree_gist`` is created in the ``public`` schema when it is missing (a superuser, or since
PostgreSQL 13 the database owner, may create it: it is a trusted extension). The default
operator class of an index is found whatever the ``search_path``, so a database whose
tables live in another schema (the test suite gives each test session its own) uses it
from there; and ``public`` is never dropped with such a schema, so neither is the extension.

Neither guard is something ``alembic check`` sees (a trigger; a constraint it does not
compare): a later migration that rebuilds ``usage_interval`` on SQLite (``batch_alter_table``
with a table copy) must create the trigger again (``create_sqlite_overlap_trigger``).
``tests/ledger/test_integrity.py`` checks that both are in place at head.

If a database already breaks either rule, the upgrade stops and names the GPUs: which of
the holders or rows is wrong is for an operator to decide, not for a migration to guess.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import scheduler.db.types

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD_INDEX = "ux_allocation_gpu_held"
EXCLUSION = "ex_usage_gpu_time"
TRIGGER = "usage_interval_no_overlap"
OVERLAP_MESSAGE = "usage rows of one GPU must not overlap in time"
# Serialises concurrent upgrades' check-then-create of the extension (CREATE EXTENSION IF
# NOT EXISTS is not safe against a concurrent create of the same extension).
_EXTENSION_LOCK = 0x616E6472  # "andr"


def create_sqlite_overlap_trigger() -> None:
    """The SQLite guard against overlapping usage rows (see the module docstring)."""
    op.execute(
        f"""
        CREATE TRIGGER IF NOT EXISTS {TRIGGER}
        BEFORE INSERT ON usage_interval
        WHEN NEW.end_s > NEW.start_s AND (
            SELECT u.end_s FROM usage_interval AS u
            WHERE u.gpu_id = NEW.gpu_id AND u.start_s < NEW.end_s AND u.end_s > u.start_s
            ORDER BY u.start_s DESC
            LIMIT 1
        ) > NEW.start_s
        BEGIN
            SELECT RAISE(ABORT, '{OVERLAP_MESSAGE}');
        END
        """
    )


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("allocation_gpu", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("released_at", scheduler.db.types.UTCDateTime(timezone=True), nullable=True)
        )
    op.execute(
        "UPDATE allocation_gpu SET released_at = (SELECT a.released_at FROM allocation AS a "
        "WHERE a.id = allocation_gpu.allocation_id)"
    )
    _refuse_if_any(
        bind,
        "SELECT gpu_id FROM allocation_gpu WHERE released_at IS NULL "
        "GROUP BY gpu_id HAVING count(*) > 1 ORDER BY gpu_id",
        "GPUs {ids} are each held by more than one unreleased allocation; release all but "
        "one (set allocation.released_at) before upgrading",
    )
    op.create_index(
        HELD_INDEX,
        "allocation_gpu",
        ["gpu_id"],
        unique=True,
        postgresql_where=sa.text("released_at IS NULL"),
        sqlite_where=sa.text("released_at IS NULL"),
    )

    op.create_index("ix_usage_gpu_start", "usage_interval", ["gpu_id", "start_s"], unique=False)
    _refuse_if_any(
        bind,
        "SELECT DISTINCT gpu_id FROM ("
        " SELECT gpu_id, start_s,"
        " max(end_s) OVER (PARTITION BY gpu_id ORDER BY start_s, id"
        " ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before_end"
        " FROM usage_interval WHERE end_s > start_s"
        ") AS ordered WHERE before_end > start_s ORDER BY gpu_id",
        "GPUs {ids} have usage rows that overlap in time; correct the ledger before upgrading",
    )
    if bind.dialect.name == "postgresql":
        _ensure_btree_gist(bind)
        op.execute(
            f"ALTER TABLE usage_interval ADD CONSTRAINT {EXCLUSION} "
            "EXCLUDE USING gist (gpu_id WITH =, int8range(start_s, end_s) WITH &&)"
        )
    elif bind.dialect.name == "sqlite":
        create_sqlite_overlap_trigger()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute(f"ALTER TABLE usage_interval DROP CONSTRAINT {EXCLUSION}")
        # btree_gist stays: other tables of the database may use it.
    elif bind.dialect.name == "sqlite":
        op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}")
    op.drop_index("ix_usage_gpu_start", table_name="usage_interval")
    op.drop_index(HELD_INDEX, table_name="allocation_gpu")
    with op.batch_alter_table("allocation_gpu", schema=None) as batch_op:
        batch_op.drop_column("released_at")


def _ensure_btree_gist(bind: sa.engine.Connection) -> None:
    bind.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EXTENSION_LOCK})
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'btree_gist'")).first():
        return
    public = bind.execute(sa.text("SELECT 1 FROM pg_namespace WHERE nspname = 'public'")).first()
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist" + (" SCHEMA public" if public else ""))


def _refuse_if_any(bind: sa.engine.Connection, query: str, message: str) -> None:
    ids = [row[0] for row in bind.execute(sa.text(query))]
    if ids:
        shown = ", ".join(str(i) for i in ids[:20]) + (" and more" if len(ids) > 20 else "")
        raise RuntimeError(f"migration 0006: {message.format(ids=shown)}.")
