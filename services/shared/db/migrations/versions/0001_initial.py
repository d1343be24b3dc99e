"""Initial log schema: requests, batches, model_versions, batch_time_samples, trainer_state.

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc_datetime() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("client_request_id", sa.String(128), nullable=True),
        sa.Column("tenant_id", sa.String(64), server_default="", nullable=False),
        sa.Column("instruction", sa.Text(), nullable=False),
        sa.Column("input_text", sa.Text(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("max_new_tokens", sa.Integer(), nullable=False),
        sa.Column("predicted_tokens", sa.Integer(), nullable=True),
        sa.Column("predictor_version", sa.Integer(), nullable=True),
        sa.Column(
            "is_prediction_fallback", sa.Boolean(), server_default=sa.false(), nullable=False
        ),
        sa.Column("generated_tokens", sa.Integer(), nullable=True),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("arrived_at", _utc_datetime(), nullable=False),
        sa.Column("started_at", _utc_datetime(), nullable=True),
        sa.Column("finished_at", _utc_datetime(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_requests"),
    )
    op.create_index("ix_requests_id", "requests", ["id"], unique=True)
    op.create_index("ix_requests_client_request_id", "requests", ["client_request_id"])
    op.create_index("ix_requests_batch_id", "requests", ["batch_id"])

    op.create_table(
        "batches",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("input_tokens_max", sa.Integer(), nullable=False),
        sa.Column("predicted_gen_tokens_max", sa.Integer(), nullable=False),
        sa.Column("actual_gen_tokens_max", sa.Integer(), nullable=True),
        sa.Column("estimated_s", sa.Float(), nullable=True),
        sa.Column("actual_s", sa.Float(), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("estimator_version", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(8), nullable=False),
        sa.Column("parent_batch_id", sa.String(36), nullable=True),
        sa.Column("valid_tokens", sa.Integer(), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", _utc_datetime(), nullable=False),
        sa.Column("started_at", _utc_datetime(), nullable=True),
        sa.Column("finished_at", _utc_datetime(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_batches"),
    )
    op.create_index("ix_batches_id", "batches", ["id"], unique=True)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("num_train_samples", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("is_pushed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", _utc_datetime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("kind", "version", name="uq_model_versions_kind_version"),
    )

    op.create_table(
        "batch_time_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("input_tokens_max", sa.Integer(), nullable=False),
        sa.Column("gen_tokens_max", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("created_at", _utc_datetime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batch_time_samples"),
    )

    op.create_table(
        "trainer_state",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        sa.Column("updated_at", _utc_datetime(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_trainer_state"),
    )


def downgrade() -> None:
    op.drop_table("trainer_state")
    op.drop_table("batch_time_samples")
    op.drop_table("model_versions")
    op.drop_index("ix_batches_id", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_requests_batch_id", table_name="requests")
    op.drop_index("ix_requests_client_request_id", table_name="requests")
    op.drop_index("ix_requests_id", table_name="requests")
    op.drop_table("requests")
