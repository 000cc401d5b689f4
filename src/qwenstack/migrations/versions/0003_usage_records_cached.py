"""Usage records: cached

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 11:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows from before this revision do not say; they count as answers from an engine.
    op.add_column(
        "usage_records",
        sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # SQLite drops columns only by copying the table: batch mode does that.
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("cached")
