"""Small async read/write helpers over the log database.

None of them commit: the caller owns the transaction (`async with session.begin(): ...`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.shared.db.models import (
    BatchRow,
    BatchTimeSample,
    ModelKind,
    ModelVersion,
    RequestRow,
    RequestStatus,
    SampleSource,
    TrainerState,
    utc_now,
)

E = TypeVar("E", bound=StrEnum)


async def fetch_requests(
    session: AsyncSession, *, since_id: int | None = None, limit: int | None = None
) -> list[RequestRow]:
    """Request rows with `seq > since_id` (all if None), oldest first, at most `limit`.

    `since_id` is a `seq` watermark: pass the last row's `seq` to get the next page.
    """
    return list(await session.scalars(_page(select(RequestRow), RequestRow.seq, since_id, limit)))


# Built once, values bound per call: the batcher runs this for Generate calls that carry an
# idempotency key, and building the statement each time (SQLAlchemy then derives its cache key anew)
# was ~7 % of the batcher's CPU in a burst (bench/batcher_ingest.py).
_COMPLETED_BY_KEYS = (
    select(RequestRow)
    .where(
        RequestRow.client_request_id.in_(bindparam("client_request_ids", expanding=True)),
        RequestRow.status == RequestStatus.COMPLETED,
    )
    .order_by(RequestRow.seq)
)
_BATCH_SIZES = select(BatchRow.id, BatchRow.size).where(BatchRow.id.in_(bindparam("batch_ids", expanding=True)))


async def find_completed_requests(
    session: AsyncSession, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], tuple[RequestRow, int | None]]:
    """For each (tenant_id, client_request_id) in `keys`: the first completed request logged under it,
    with its batch's size; keys with none are left out. Two queries whatever the number of keys."""
    if not keys:
        return {}
    wanted = set(keys)
    rows = await session.scalars(_COMPLETED_BY_KEYS, {"client_request_ids": sorted({k for _, k in keys})})
    found: dict[tuple[str, str], RequestRow] = {}
    for row in rows:  # oldest first: the first one logged under a key answers it
        key = (row.tenant_id, row.client_request_id)
        if key in wanted and key not in found:
            found[key] = row
    batch_ids = sorted({row.batch_id for row in found.values() if row.batch_id})
    sizes = dict((await session.execute(_BATCH_SIZES, {"batch_ids": batch_ids})).all()) if batch_ids else {}
    return {key: (row, sizes.get(row.batch_id)) for key, row in found.items()}


async def fetch_batches(
    session: AsyncSession, *, since_id: int | None = None, limit: int | None = None
) -> list[BatchRow]:
    """Batch rows with `seq > since_id` (all if None), oldest first, at most `limit`."""
    return list(await session.scalars(_page(select(BatchRow), BatchRow.seq, since_id, limit)))


async def fetch_batch_time_samples(
    session: AsyncSession,
    *,
    source: SampleSource | str | None = None,
    since_id: int | None = None,
    limit: int | None = None,
) -> list[BatchTimeSample]:
    """Batch-time samples, oldest first, optionally only from `source`."""
    query = select(BatchTimeSample)
    if source is not None:
        query = query.where(BatchTimeSample.source == _member("source", source, SampleSource))
    return list(await session.scalars(_page(query, BatchTimeSample.id, since_id, limit)))


async def latest_model_version(session: AsyncSession, kind: ModelKind | str) -> ModelVersion | None:
    """The highest-numbered version of `kind`, or None."""
    kind = _member("kind", kind, ModelKind)
    query = (
        select(ModelVersion)
        .where(ModelVersion.kind == kind)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    return await session.scalar(query)


async def add_model_version(session: AsyncSession, **fields: Any) -> ModelVersion:
    """Insert a ModelVersion with the next `version` of its `kind` (max + 1, starting at 1).

    `fields` are ModelVersion columns except `version`. The number is allocated inside the
    caller's transaction; two concurrent writers of one kind would collide on the
    (kind, version) unique constraint and one gets an IntegrityError to retry. Magnus has a
    single trainer, so that is not worth a table lock.
    """
    if "version" in fields:
        raise ValueError("add_model_version allocates `version` itself; do not pass it")
    kind = fields["kind"] = _member("kind", fields.get("kind"), ModelKind)
    max_version = await session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.kind == kind)
    )
    model_version = ModelVersion(**fields, version=(max_version or 0) + 1)
    session.add(model_version)
    await session.flush()
    return model_version


async def get_state(session: AsyncSession, key: str) -> dict[str, Any] | None:
    """The JSON value stored under `key`, or None."""
    value = await session.scalar(select(TrainerState.value).where(TrainerState.key == key))
    return None if value is None else dict(value)


async def set_state(session: AsyncSession, key: str, value: dict[str, Any]) -> None:
    """Store `value` under `key`, replacing any previous value (one upsert statement)."""
    if not isinstance(value, dict):
        raise TypeError(f"state value must be a dict, got {type(value).__name__}")
    dialect_name = session.get_bind().dialect.name
    if dialect_name == "postgresql":
        insert = postgresql_insert
    elif dialect_name == "sqlite":
        insert = sqlite_insert
    else:
        raise NotImplementedError(f"set_state has no upsert for dialect {dialect_name!r}")
    now = utc_now()
    statement = insert(TrainerState).values(key=key, value=value, updated_at=now)
    statement = statement.on_conflict_do_update(
        index_elements=[TrainerState.key],
        set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
    )
    await session.execute(statement)


def _page(
    query: Select[Any], order_column: Any, since_id: int | None, limit: int | None
) -> Select[Any]:
    if since_id is not None:
        query = query.where(order_column > since_id)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        query = query.limit(limit)
    return query.order_by(order_column)


def _member(name: str, value: object, enum_type: type[E]) -> E:
    """`value` as a member of `enum_type`; ValueError naming the field and the choices if it is none."""
    try:
        return enum_type(value)
    except ValueError:
        choices = tuple(member.value for member in enum_type)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None
