"""API keys: cache_all

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 11:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Keys made before this revision keep their behaviour: only deterministic answers cached.
    op.add_column(
        "api_keys",
        sa.Column("cache_all", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # SQLite drops columns only by copying the table: batch mode does that.
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("cache_all")
