"""SQLAlchemy models of the Magnus log database.

The batcher appends `requests` and `batches` rows when they reach a terminal state; the trainer
reads them back, fits the length predictor and the batch-time estimator, and records each trained
artifact in `model_versions`. All timestamps are wall-clock UTC.

`requests` and `batches` have an Integer autoincrement `seq` primary key (on SQLite only an
INTEGER PRIMARY KEY autoincrements) so readers can page with a "rows after seq N" watermark; the
batcher's UUID lives in the unique `id` column.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator



# The stored values are these strings, exactly as before the enums: no migration was needed.
class RequestStatus(StrEnum):
    """How a request ended (`requests.status`)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class BatchOutcome(StrEnum):
    """How one batch attempt ended (`batches.outcome`)."""

    OK = "ok"
    OOM = "oom"  # the worker ran out of memory; the batch is split or its requests fail
    LOST = "lost"  # its lease ran out before the worker reported
    FAILED = "failed"


class ModelKind(StrEnum):
    """Which model a `model_versions` row holds."""

    PREDICTOR = "predictor"
    ESTIMATOR = "estimator"


class SampleSource(StrEnum):
    """Where a `batch_time_samples` row was measured."""

    CALIBRATION = "calibration"
    LOG = "log"


REQUEST_STATUSES = tuple(RequestStatus)
BATCH_OUTCOMES = tuple(BatchOutcome)
MODEL_KINDS = tuple(ModelKind)
SAMPLE_SOURCES = tuple(SampleSource)

# Fixed constraint names so the hand-written migration and the models agree on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utc_now() -> datetime:
    """Current wall-clock time, timezone-aware UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that only accepts aware datetimes and always returns UTC.

    SQLite has no timezone type: SQLAlchemy would silently store an aware value's local wall
    time and read it back naive. Normalising to UTC on the way in and tagging UTC on the way out
    gives both backends the same behaviour.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # SQLite returns naive values; they were stored as UTC by process_bind_param.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A `StrEnum` stored as its value in a VARCHAR: writes refuse a value outside the enum, reads
    return the member. Plain strings equal to a value are accepted (a `StrEnum` is a `str`)."""

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[E], length: int) -> None:
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum_type(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_type(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JSON()}


class RequestRow(Base):
    """One served request, written once it reaches a terminal `status`."""

    __tablename__ = "requests"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    client_request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    instruction: Mapped[str] = mapped_column(Text)
    input_text: Mapped[str] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    predicted_tokens: Mapped[int | None] = mapped_column(Integer)
    predictor_version: Mapped[int | None] = mapped_column(Integer)
    is_prediction_fallback: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )
    generated_tokens: Mapped[int | None] = mapped_column(Integer)
    # the answer itself, kept so a client retrying its request id after a batcher restart gets it
    output_text: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str | None] = mapped_column(String(36), index=True)
    status: Mapped[RequestStatus] = mapped_column(EnumText(RequestStatus, 16))
    error: Mapped[str | None] = mapped_column(Text)
    arrived_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class BatchRow(Base):
    """One executed batch attempt, written when it ends with an `outcome`.

    Token maxima are per batch: `input_tokens_max` is L(B), `predicted_gen_tokens_max` is the
    predicted G(B). Durations are seconds.
    """

    __tablename__ = "batches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    size: Mapped[int] = mapped_column(Integer)
    input_tokens_max: Mapped[int] = mapped_column(Integer)
    predicted_gen_tokens_max: Mapped[int] = mapped_column(Integer)
    actual_gen_tokens_max: Mapped[int | None] = mapped_column(Integer)
    estimated_s: Mapped[float | None] = mapped_column(Float)
    actual_s: Mapped[float | None] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    estimator_version: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[BatchOutcome] = mapped_column(EnumText(BatchOutcome, 8))
    # Set when this batch was created by splitting an OOM'd batch.
    parent_batch_id: Mapped[str | None] = mapped_column(String(36))
    valid_tokens: Mapped[int | None] = mapped_column(Integer)
    total_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class ModelVersion(Base):
    """A trained predictor or estimator artifact; `version` counts up from 1 per `kind`."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("kind", "version", name="uq_model_versions_kind_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[ModelKind] = mapped_column(EnumText(ModelKind, 16))
    version: Mapped[int] = mapped_column(Integer)
    artifact_uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    num_train_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    is_pushed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class BatchTimeSample(Base):
    """One measured batch duration (seconds) for fitting the batch-time estimator."""

    __tablename__ = "batch_time_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_size: Mapped[int] = mapped_column(Integer)
    input_tokens_max: Mapped[int] = mapped_column(Integer)
    gen_tokens_max: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    source: Mapped[SampleSource] = mapped_column(EnumText(SampleSource, 16))
    device: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class TrainerState(Base):
    """Small JSON documents the trainer keeps between runs (watermarks, schedules)."""

    __tablename__ = "trainer_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=utc_now, onupdate=utc_now)
