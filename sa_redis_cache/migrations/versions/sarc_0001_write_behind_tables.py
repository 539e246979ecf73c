"""Write-behind tables: partition offsets and dead letters.

Revision ID: sarc_0001
Revises:
Create Date: 2026-11-26 09:40:00

"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

if TYPE_CHECKING:
    from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "sarc_0001"
down_revision: str | Sequence[str] | None = None
# The label lets an application that lists our versions directory in its own
# version_locations run "alembic upgrade sa_redis_cache@head".
branch_labels: str | Sequence[str] | None = ("sa_redis_cache",)
depends_on: str | Sequence[str] | None = None

# The tables are spelled out here rather than imported from sa_redis_cache.schema: a revision
# must keep creating what it created on the day it was written, whatever schema.py says later.


def upgrade() -> None:
    """Create sarc_wb_offsets and sarc_dead_letters."""
    op.create_table(
        "sarc_wb_offsets",
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("last_id", sa.Text(), nullable=False),
        sa.Column("applied_ops", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("stream", name="sarc_wb_offsets_pkey"),
        comment="sa_redis_cache: last Redis stream id applied per write-behind partition",
    )
    op.create_table(
        "sarc_dead_letters",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("stream", sa.Text(), nullable=False),
        sa.Column("entry_id", sa.Text(), nullable=False),
        sa.Column("op", sa.Text(), nullable=True),
        sa.Column("pk", postgresql.JSONB(), nullable=True),
        sa.Column("payload", postgresql.JSONB(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column(
            "failed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="sarc_dead_letters_pkey"),
        comment="sa_redis_cache: write-behind operations that failed on every attempt",
    )
    op.create_index(
        "ix_sarc_dead_letters_pending",
        "sarc_dead_letters",
        ["namespace", "table_name"],
        postgresql_where=sa.text("replayed_at IS NULL"),
    )


def downgrade() -> None:
    """Drop both tables; pending dead letters and offsets are lost with them."""
    op.drop_index("ix_sarc_dead_letters_pending", table_name="sarc_dead_letters")
    op.drop_table("sarc_dead_letters")
    op.drop_table("sarc_wb_offsets")
