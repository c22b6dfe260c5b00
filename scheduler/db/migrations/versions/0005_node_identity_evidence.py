"""node identity, GPU inventory details, evidence on the ledger

Nodes remember who set their status by hand (an admin's cordon is lifted only by an admin),
their clock skew, whether NVML itself is broken on them, when they were retired, and their
CUDA driver; GPUs keep their full inventory (compute capability, PCI bus id, serial, MIG)
and their latest process count and throttle reasons. A GPU UUID claimed by a second node is
a ``gpu_conflict`` for an admin; a token may be bound to one site (a site's registration
token). ``gpu_evidence`` keeps the agents' per-GPU windows, and usage rows carry the
evidence drawn from them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import scheduler.db.types

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UTC = scheduler.db.types.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("node", schema=None) as b:
        b.add_column(sa.Column("cuda_driver_version", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("status_set_by", sa.String(length=16), nullable=True))
        b.add_column(sa.Column("clock_skew_ms", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("gpu_source_error", sa.String(length=500), nullable=True))
        b.add_column(sa.Column("retired_at", _UTC, nullable=True))
    with op.batch_alter_table("gpu", schema=None) as b:
        b.add_column(sa.Column("process_count", sa.Integer(), nullable=True))
        b.add_column(sa.Column("throttle_reasons", sa.String(length=500), nullable=True))
        b.add_column(sa.Column("compute_capability", sa.String(length=8), nullable=True))
        b.add_column(sa.Column("pci_bus_id", sa.String(length=32), nullable=True))
        b.add_column(sa.Column("serial", sa.String(length=64), nullable=True))
        b.add_column(sa.Column("mig_enabled", sa.Boolean(), nullable=True))
        b.add_column(
            sa.Column("mig_instances", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
    with op.batch_alter_table("api_token", schema=None) as b:
        b.add_column(sa.Column("site_id", sa.Integer(), nullable=True))
        b.create_foreign_key("fk_api_token_site_id_site", "site", ["site_id"], ["id"])
    with op.batch_alter_table("usage_interval", schema=None) as b:
        b.add_column(sa.Column("evidence_s", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("utilization_pct_avg", sa.Integer(), nullable=True))
        b.add_column(sa.Column("energy_mj", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("process_seen", sa.Boolean(), nullable=True))
    op.create_table(
        "gpu_conflict",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("gpu_uuid", sa.String(length=96), nullable=False),
        sa.Column("owner_node_id", sa.Integer(), nullable=False),
        sa.Column("claimant_provider_id", sa.Integer(), nullable=False),
        sa.Column("claimant_node", sa.String(length=63), nullable=False),
        sa.Column("first_seen_at", _UTC, nullable=False),
        sa.Column("last_seen_at", _UTC, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("resolved_at", _UTC, nullable=True),
        sa.Column("resolution", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(["claimant_provider_id"], ["provider.id"]),
        sa.ForeignKeyConstraint(["owner_node_id"], ["node.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("gpu_uuid", "claimant_node", "claimant_provider_id"),
    )
    op.create_index("ix_gpu_conflict_gpu_uuid", "gpu_conflict", ["gpu_uuid"])
    op.create_table(
        "gpu_evidence",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("gpu_id", sa.Integer(), nullable=False),
        sa.Column("start_s", sa.BigInteger(), nullable=False),
        sa.Column("end_s", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("utilization_pct_avg", sa.Integer(), nullable=True),
        sa.Column("energy_mj", sa.BigInteger(), nullable=True),
        sa.Column("process_seen", sa.Boolean(), nullable=True),
        sa.Column("received_at", _UTC, nullable=False),
        sa.ForeignKeyConstraint(["gpu_id"], ["gpu.id"]),
        sa.ForeignKeyConstraint(["node_id"], ["node.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_gpu_evidence_gpu_start", "gpu_evidence", ["gpu_id", "start_s"])
    op.create_index("ix_gpu_evidence_node_id", "gpu_evidence", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_gpu_evidence_node_id", table_name="gpu_evidence")
    op.drop_index("ix_gpu_evidence_gpu_start", table_name="gpu_evidence")
    op.drop_table("gpu_evidence")
    op.drop_index("ix_gpu_conflict_gpu_uuid", table_name="gpu_conflict")
    op.drop_table("gpu_conflict")
    with op.batch_alter_table("usage_interval", schema=None) as b:
        for name in ("process_seen", "energy_mj", "utilization_pct_avg", "evidence_s"):
            b.drop_column(name)
    with op.batch_alter_table("api_token", schema=None) as b:
        b.drop_constraint("fk_api_token_site_id_site", type_="foreignkey")
        b.drop_column("site_id")
    with op.batch_alter_table("gpu", schema=None) as b:
        for name in (
            "mig_instances",
            "mig_enabled",
            "serial",
            "pci_bus_id",
            "compute_capability",
            "throttle_reasons",
            "process_count",
        ):
            b.drop_column(name)
    with op.batch_alter_table("node", schema=None) as b:
        for name in (
            "retired_at",
            "gpu_source_error",
            "clock_skew_ms",
            "status_set_by",
            "cuda_driver_version",
        ):
            b.drop_column(name)
