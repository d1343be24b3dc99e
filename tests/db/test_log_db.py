"""Log database on SQLite and PostgreSQL: migrations, the buffered LogWriter, query helpers."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, inspect, select, text
from sqlalchemy.pool import NullPool

from services.shared.db import (
    Base,
    BatchOutcome,
    BatchRow,
    BatchTimeSample,
    LogWriter,
    ModelKind,
    RequestRow,
    RequestStatus,
    SampleSource,
    add_model_version,
    current,
    downgrade,
    fetch_batch_time_samples,
    fetch_requests,
    get_state,
    head_revision,
    latest_model_version,
    make_engine,
    set_state,
    upgrade,
)

pytestmark = pytest.mark.asyncio

LOG_TABLES = {"requests", "batches", "model_versions", "batch_time_samples", "trainer_state"}
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
WRITER_LOGGER = "services.shared.db.log_writer"


def request_row(index: int, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": str(uuid.uuid4()),
        "instruction": "summarise",
        "input_text": f"text {index}",
        "input_tokens": 10 + index,
        "max_new_tokens": 256,
        "status": "completed",
        "arrived_at": T0 + timedelta(seconds=index),
    }
    row.update(overrides)
    return row


def batch_row(index: int) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "size": 4,
        "input_tokens_max": 100 + index,
        "predicted_gen_tokens_max": 50,
        "outcome": "ok",
    }


def sample_row(index: int, source: str = "log") -> dict[str, object]:
    return {
        "batch_size": 1 + index % 8,
        "input_tokens_max": 128,
        "gen_tokens_max": 64,
        "duration_s": 0.5 + index,
        "source": source,
        "device": "cpu",
    }


async def wait_until(predicate: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    """Poll `predicate` every 10 ms; fail after `timeout_s` seconds."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


async def table_names(url: str) -> set[str]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def column_names(url: str, table: str) -> set[str]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda c: inspect(c).get_columns(table))
        return {column["name"] for column in columns}
    finally:
        await engine.dispose()


async def count_rows(session_factory, model) -> int:
    async with session_factory() as session:
        return await session.scalar(select(func.count()).select_from(model))


# -- migrations -------------------------------------------------------------------------------


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    assert current(database_url) is None  # called inside a running loop on purpose
    await asyncio.to_thread(upgrade, database_url)
    assert LOG_TABLES <= await table_names(database_url)
    assert current(database_url) == head_revision() == "0002"

    await asyncio.to_thread(downgrade, database_url, "0001")  # one step: the output_text column goes
    assert current(database_url) == "0001"
    assert "output_text" not in await column_names(database_url, "requests")
    await asyncio.to_thread(upgrade, database_url)
    assert "output_text" in await column_names(database_url, "requests")

    await asyncio.to_thread(downgrade, database_url)
    assert not (LOG_TABLES & await table_names(database_url))
    assert current(database_url) is None

    await asyncio.to_thread(upgrade, database_url)
    assert LOG_TABLES <= await table_names(database_url)
    assert current(database_url) == "0002"


async def test_migration_matches_models(engine) -> None:
    async with engine.connect() as connection:
        diff = await connection.run_sync(
            lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
        )
    assert diff == []


# -- LogWriter --------------------------------------------------------------------------------


async def test_writer_writes_every_row_in_few_transactions(engine, session_factory) -> None:
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda _conn: commits.append(1))
    writer = LogWriter(session_factory, max_batch_rows=500)
    for index in range(1200):
        # Rows with different optional columns must share a batch.
        extra = {"predicted_tokens": 7, "tenant_id": "t1"} if index % 3 == 0 else {}
        writer.add_request(request_row(index, **extra))
    for index in range(300):
        writer.add_batch(batch_row(index))
    for index in range(50):
        writer.add_batch_time_sample(sample_row(index))
    assert writer.num_buffered_rows == 1550

    assert await writer.flush() is True
    assert writer.num_written_rows == 1550
    assert writer.num_buffered_rows == 0
    assert len(commits) == 4  # ceil(1550 / 500) transactions, not 1550
    assert await count_rows(session_factory, RequestRow) == 1200
    assert await count_rows(session_factory, BatchRow) == 300
    assert await count_rows(session_factory, BatchTimeSample) == 50

    async with session_factory() as session:
        rows = await fetch_requests(session, limit=3)
    assert [row.tenant_id for row in rows] == ["t1", "", ""]  # column default applied
    assert rows[1].is_prediction_fallback is False
    assert rows[1].arrived_at == T0 + timedelta(seconds=1)
    assert rows[1].arrived_at.tzinfo is not None


async def test_writer_task_flushes_in_background(session_factory) -> None:
    writer = LogWriter(session_factory, flush_interval_s=0.02)
    writer.start()
    for index in range(20):
        writer.add_request(request_row(index))
    await wait_until(lambda: writer.num_written_rows == 20)
    writer.add_batch(batch_row(0))
    await writer.close()
    assert writer.num_written_rows == 21
    assert await count_rows(session_factory, BatchRow) == 1
    with pytest.raises(RuntimeError, match="closed"):
        writer.add_batch(batch_row(1))


async def test_outage_keeps_rows_buffered_then_writes_them_once(
    migrated_url, session_factory, database_outage, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger=WRITER_LOGGER)
    writer = LogWriter(session_factory, flush_interval_s=0.02, max_retry_delay_s=0.1)
    writer.start()
    rows = [request_row(index) for index in range(100)]
    async with database_outage(migrated_url):
        for row in rows:
            writer.add_request(row)
        assert await writer.flush() is False
        await wait_until(lambda: writer.num_write_failures >= 3)
        assert writer.num_buffered_rows == 100
        assert writer.num_written_rows == 0
    failure_warnings = [r for r in caplog.records if "write failed" in r.getMessage()]
    assert len(failure_warnings) == 1  # once per outage, not per attempt or row

    await wait_until(lambda: writer.num_buffered_rows == 0)
    await writer.close()
    assert writer.num_written_rows == 100
    assert writer.num_dropped_rows == writer.num_rejected_rows == 0
    async with session_factory() as session:
        written_ids = [row.id for row in await fetch_requests(session)]
    assert sorted(written_ids) == sorted(row["id"] for row in rows)  # each exactly once
    assert any("recovered" in r.getMessage() for r in caplog.records)


async def test_close_during_outage_counts_unwritten_rows_as_dropped(
    migrated_url, session_factory, database_outage, caplog
) -> None:
    writer = LogWriter(session_factory, flush_interval_s=0.02, max_retry_delay_s=0.05)
    async with database_outage(migrated_url):
        writer.add_request(request_row(0))
        with caplog.at_level(logging.ERROR, logger=WRITER_LOGGER):
            await writer.close(timeout_s=0.2)
    assert writer.num_dropped_rows == 1
    assert writer.num_buffered_rows == 0
    assert any("unwritten" in r.getMessage() for r in caplog.records)


async def test_full_buffer_drops_oldest_rows(session_factory, caplog) -> None:
    writer = LogWriter(session_factory, max_buffer_rows=10, max_batch_rows=5)
    rows = [request_row(index) for index in range(15)]
    with caplog.at_level(logging.ERROR, logger=WRITER_LOGGER):
        for row in rows:
            writer.add_request(row)
    assert writer.num_dropped_rows == 5
    assert writer.num_buffered_rows == 10
    assert any(r.levelno == logging.ERROR and "full" in r.getMessage() for r in caplog.records)

    assert await writer.flush() is True
    async with session_factory() as session:
        written_ids = [row.id for row in await fetch_requests(session)]
    assert written_ids == [row["id"] for row in rows[5:]]


async def test_rejected_row_does_not_block_the_others(session_factory) -> None:
    writer = LogWriter(session_factory)
    duplicate = request_row(0)
    writer.add_request(duplicate)
    writer.add_request(request_row(1))
    writer.add_request(dict(duplicate, input_text="retried after a lost commit ack"))
    writer.add_request(request_row(2))
    assert await writer.flush() is True
    assert writer.num_rejected_rows == 1
    assert writer.num_written_rows == 3
    assert writer.num_buffered_rows == 0
    assert await count_rows(session_factory, RequestRow) == 3


async def test_malformed_rows_fail_in_the_caller(session_factory) -> None:
    writer = LogWriter(session_factory)
    with pytest.raises(ValueError, match="unknown requests columns"):
        writer.add_request(request_row(0, colour="blue"))
    with pytest.raises(ValueError, match="missing required"):
        writer.add_batch({"id": "b1"})
    with pytest.raises(ValueError, match="naive datetime"):
        writer.add_request(request_row(0, arrived_at=datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match="requests.status must be one of"):
        writer.add_request(request_row(0, status="done"))
    with pytest.raises(ValueError, match="batches.outcome must be one of"):
        writer.add_batch(dict(batch_row(0), outcome="OOM"))
    assert writer.num_buffered_rows == 0


async def test_statuses_are_stored_as_their_strings_and_read_as_enums(engine, session_factory) -> None:
    # The enums changed no stored value: rows written as plain strings before them and rows
    # written as members are the same bytes, and both read back as members.
    writer = LogWriter(session_factory)
    writer.add_request(request_row(0, status="cancelled"))
    writer.add_request(request_row(1, status=RequestStatus.COMPLETED))
    writer.add_batch(dict(batch_row(0), outcome=BatchOutcome.OOM))
    writer.add_batch_time_sample(sample_row(0, SampleSource.CALIBRATION))
    assert await writer.flush() is True
    async with engine.connect() as connection:
        raw = (await connection.execute(text("SELECT status FROM requests ORDER BY seq"))).scalars().all()
        assert [type(value) for value in raw] == [str, str]
        assert raw == ["cancelled", "completed"]
        assert (await connection.execute(text("SELECT outcome FROM batches"))).scalar_one() == "oom"
    async with session_factory() as session:
        statuses = [row.status for row in await fetch_requests(session)]
        assert statuses == [RequestStatus.CANCELLED, RequestStatus.COMPLETED]
        assert all(type(status) is RequestStatus for status in statuses)
        assert (await session.scalar(select(BatchRow.outcome))) is BatchOutcome.OOM
        assert (await fetch_batch_time_samples(session, source="calibration"))[0].source is SampleSource.CALIBRATION
        with pytest.raises(ValueError, match="source must be one of"):
            await fetch_batch_time_samples(session, source="bench")


# -- queries ----------------------------------------------------------------------------------


def model_fields(kind: str, **overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "kind": kind,
        "artifact_uri": f"file:///models/{kind}.pt",
        "sha256": "0" * 64,
        "num_train_samples": 1000,
        "metrics": {"mae_tokens": 12.5},
    }
    fields.update(overrides)
    return fields


async def test_model_versions_count_up_per_kind(session_factory) -> None:
    async with session_factory() as session, session.begin():
        assert await latest_model_version(session, "predictor") is None
        versions = [
            (await add_model_version(session, **model_fields(kind))).version
            for kind in ("predictor", "predictor", "estimator", "predictor", "estimator")
        ]
    assert versions == [1, 2, 1, 3, 2]
    async with session_factory() as session:
        latest = await latest_model_version(session, "predictor")
        assert latest is not None and latest.version == 3
        assert latest.metrics == {"mae_tokens": 12.5}
        assert latest.is_pushed is False
        assert (await latest_model_version(session, "estimator")).version == 2
        assert latest.kind is ModelKind.PREDICTOR
        with pytest.raises(ValueError, match="kind"):
            await latest_model_version(session, "tokenizer")


async def test_state_round_trip_and_upsert(session_factory) -> None:
    async with session_factory() as session, session.begin():
        assert await get_state(session, "watermark") is None
        await set_state(session, "watermark", {"requests_seq": 10})
    async with session_factory() as session, session.begin():
        assert await get_state(session, "watermark") == {"requests_seq": 10}
        await set_state(session, "watermark", {"requests_seq": 42, "note": "ü"})
    async with session_factory() as session:
        assert await get_state(session, "watermark") == {"requests_seq": 42, "note": "ü"}


async def test_fetch_requests_pages_by_seq(session_factory) -> None:
    writer = LogWriter(session_factory)
    rows = [request_row(index) for index in range(25)]
    for row in rows:
        writer.add_request(row)
    for index in range(6):
        writer.add_batch_time_sample(sample_row(index, "calibration" if index < 2 else "log"))
    await writer.flush()

    pages: list[list[str]] = []
    since_id = None
    async with session_factory() as session:
        while page := await fetch_requests(session, since_id=since_id, limit=10):
            pages.append([row.id for row in page])
            since_id = page[-1].seq
        assert [len(page) for page in pages] == [10, 10, 5]
        assert [row_id for page in pages for row_id in page] == [row["id"] for row in rows]
        calibration = await fetch_batch_time_samples(session, source="calibration")
        assert [sample.duration_s for sample in calibration] == [0.5, 1.5]
        assert len(await fetch_batch_time_samples(session)) == 6


async def test_datetimes_are_stored_as_utc(session_factory) -> None:
    writer = LogWriter(session_factory)
    plus_two = timezone(timedelta(hours=2))
    writer.add_request(request_row(0, arrived_at=datetime(2025, 1, 1, 14, 0, tzinfo=plus_two)))
    await writer.flush()
    async with session_factory() as session:
        (row,) = await fetch_requests(session)
    assert row.arrived_at == T0
    assert row.arrived_at.utcoffset() == timedelta(0)
