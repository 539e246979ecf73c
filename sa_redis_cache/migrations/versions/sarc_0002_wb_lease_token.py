"""Write-behind fencing: the lease token of each partition's offset row.

Revision ID: sarc_0002
Revises: sarc_0001
Create Date: 2026-12-04 20:00:00

"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from alembic import op

if TYPE_CHECKING:
    from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "sarc_0002"
down_revision: str | Sequence[str] | None = "sarc_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add sarc_wb_offsets.lease_token (0 on existing rows: no worker holds a token yet)."""
    # A constant default: Postgres 11+ adds the column without rewriting the table.
    op.add_column(
        "sarc_wb_offsets",
        sa.Column("lease_token", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    """Drop the column; workers of the previous version do not fence."""
    op.drop_column("sarc_wb_offsets", "lease_token")
