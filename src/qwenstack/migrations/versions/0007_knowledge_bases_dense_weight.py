"""Knowledge bases: dense_weight

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29 06:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Bases from before this revision have no tuned weight: the setting's rule applies.
    op.add_column("knowledge_bases", sa.Column("dense_weight", sa.Float(), nullable=True))


def downgrade() -> None:
    # SQLite drops columns only by copying the table: batch mode does that.
    with op.batch_alter_table("knowledge_bases") as batch:
        batch.drop_column("dense_weight")
