"""Usage records: tool_calls; API keys: thinking

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 02:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows from before this revision did not count them: 0.
    op.add_column(
        "usage_records",
        sa.Column("tool_calls", sa.Integer(), nullable=False, server_default="0"),
    )
    # Keys from before this revision may think, as they could.
    op.add_column(
        "api_keys",
        sa.Column("thinking", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    # SQLite drops columns only by copying the table: batch mode does that.
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("thinking")
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("tool_calls")
