"""open allocation GPUs by node

Every batch of heartbeats answers with the GPUs of its nodes that open allocations hold
(the agent's busy flags); a partial index on ``allocation_gpu (node_id) WHERE released_at
IS NULL`` finds them without reading a node's whole allocation history.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("released_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_allocation_gpu_open_node",
        "allocation_gpu",
        ["node_id"],
        postgresql_where=_OPEN,
        sqlite_where=_OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_allocation_gpu_open_node", table_name="allocation_gpu")
