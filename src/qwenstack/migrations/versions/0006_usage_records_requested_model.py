"""Usage records: requested_model

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 05:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `model` is the model that served; this is the name the client sent (an alias, or a model
    # that fell back to another). Rows from before this revision did not keep it: NULL.
    op.add_column("usage_records", sa.Column("requested_model", sa.String(256), nullable=True))


def downgrade() -> None:
    # SQLite drops columns only by copying the table: batch mode does that.
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("requested_model")
