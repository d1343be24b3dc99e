"""Buffered, batched log inserts, kept off the request path.

Request handlers call `add_*()`, which only appends to an in-memory buffer; one background task
owns the writes and inserts the buffer in chunks of `max_batch_rows` rows per transaction.

Failure policy:
* The database is down or locked: the rows stay buffered and are retried with exponential
  backoff; one warning per outage, not per row.
* The buffer is full: the OLDEST rows are dropped, counted in `num_dropped_rows` and logged at
  ERROR level. Recent rows are the most useful for retraining.
* The rows themselves are bad (a duplicate id, a value out of range): retrying cannot help, so
  the chunk is retried row by row and only the offending rows are dropped, counted in
  `num_rejected_rows` and logged at ERROR level. A duplicate is also what a retry produces when
  a commit succeeded but its acknowledgement was lost, so this keeps requests and batches
  written exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import CompileError, DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.shared.db.models import Base, BatchRow, BatchTimeSample, EnumText, RequestRow

logger = logging.getLogger(__name__)

_Entry = tuple[type[Base], dict[str, Any]]

# SQLSTATE classes meaning "this data can never be inserted": 22 data exception, 23 integrity.
_BAD_ROWS_SQLSTATE_CLASSES = ("22", "23")


class LogWriter:
    """Buffers log rows in memory and writes them in batches from one background task.

    Call `add_*()`, `start()`, `flush()` and `close()` from the event loop's thread.
    """

    def __init__(
        self,
        session_factory: async_sessionmaker[AsyncSession],
        *,
        max_buffer_rows: int = 100_000,
        flush_interval_s: float = 0.2,
        max_batch_rows: int = 500,
        max_retry_delay_s: float = 5.0,
    ) -> None:
        """`max_buffer_rows`: rows kept while the DB is unavailable before the oldest are
        dropped. `flush_interval_s`: seconds between writes when all is well (a full chunk of
        `max_batch_rows` rows is written at once). `max_retry_delay_s`: cap of the retry backoff.
        """
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if max_buffer_rows < max_batch_rows:
            raise ValueError(
                f"max_buffer_rows ({max_buffer_rows}) must be >= max_batch_rows ({max_batch_rows})"
            )
        if flush_interval_s <= 0 or max_retry_delay_s < flush_interval_s:
            raise ValueError(
                "need 0 < flush_interval_s <= max_retry_delay_s, got "
                f"flush_interval_s={flush_interval_s}, max_retry_delay_s={max_retry_delay_s}"
            )
        self._session_factory = session_factory
        self._max_buffer_rows = max_buffer_rows
        self._flush_interval_s = flush_interval_s
        self._max_batch_rows = max_batch_rows
        self._max_retry_delay_s = max_retry_delay_s

        self._buffer: deque[_Entry] = deque()
        # Rows taken out of the buffer by a write in progress; they still count as buffered.
        self._num_in_flight_rows = 0
        self._write_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._is_closing = False
        self._is_closed = False

        self._num_written_rows = 0
        self._num_dropped_rows = 0
        self._num_rejected_rows = 0
        self._num_write_failures = 0
        self._num_consecutive_failures = 0
        self._num_unreported_dropped_rows = 0

    # -- counters --------------------------------------------------------------------------

    @property
    def num_buffered_rows(self) -> int:
        """Rows accepted but not yet written (including a write in progress)."""
        return len(self._buffer) + self._num_in_flight_rows

    @property
    def num_written_rows(self) -> int:
        """Rows committed to the database."""
        return self._num_written_rows

    @property
    def num_dropped_rows(self) -> int:
        """Rows lost because the buffer was full, or still unwritten at close()."""
        return self._num_dropped_rows

    @property
    def num_rejected_rows(self) -> int:
        """Rows the database refused for good (duplicate id, value out of range)."""
        return self._num_rejected_rows

    @property
    def num_write_failures(self) -> int:
        """Failed write attempts (each retry of an outage counts once)."""
        return self._num_write_failures

    # -- producer side (never awaits) ------------------------------------------------------

    def add_request(self, row: Mapping[str, Any]) -> None:
        """Buffer one `requests` row (column name -> value); raises ValueError if malformed."""
        self._add(RequestRow, row)

    def add_batch(self, row: Mapping[str, Any]) -> None:
        """Buffer one `batches` row (column name -> value); raises ValueError if malformed."""
        self._add(BatchRow, row)

    def add_batch_time_sample(self, row: Mapping[str, Any]) -> None:
        """Buffer one `batch_time_samples` row; raises ValueError if malformed."""
        self._add(BatchTimeSample, row)

    def _add(self, model: type[Base], row: Mapping[str, Any]) -> None:
        if self._is_closed:
            raise RuntimeError("LogWriter is closed")
        self._buffer.append((model, checked_row(model, row)))
        self._drop_oldest_over_capacity()
        # During an outage the backoff decides when to retry, not the buffer size.
        if len(self._buffer) >= self._max_batch_rows and self._num_consecutive_failures == 0:
            self._wake.set()

    def _drop_oldest_over_capacity(self) -> None:
        num_to_drop = min(len(self._buffer), self.num_buffered_rows - self._max_buffer_rows)
        if num_to_drop <= 0:
            return
        for _ in range(num_to_drop):
            self._buffer.popleft()
        self._num_dropped_rows += num_to_drop
        if self._num_unreported_dropped_rows == 0:
            logger.error(
                "log buffer full (%d rows): dropping the oldest rows (%d dropped so far)",
                self._max_buffer_rows,
                self._num_dropped_rows,
            )
        self._num_unreported_dropped_rows += num_to_drop

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background writer task on the running event loop."""
        if self._task is not None or self._is_closing:
            raise RuntimeError("LogWriter already started or closed")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="magnus-log-writer")

    async def close(self, *, timeout_s: float = 5.0) -> None:
        """Stop the background task and write what is left, retrying for up to `timeout_s`.

        Rows still unwritten after that are lost: they are counted in `num_dropped_rows` and
        logged at ERROR level.
        """
        self._is_closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        deadline_s = time.monotonic() + timeout_s
        retry_delay_s = self._flush_interval_s
        while self._buffer and not await self.flush():
            if time.monotonic() + retry_delay_s > deadline_s:
                break
            await asyncio.sleep(retry_delay_s)
            retry_delay_s = min(2 * retry_delay_s, self._max_retry_delay_s)
        self._is_closed = True
        self._report_dropped_rows()
        if self._buffer:
            num_lost_rows = len(self._buffer)
            self._buffer.clear()
            self._num_dropped_rows += num_lost_rows
            logger.error("log writer closed with %d rows unwritten; they are lost", num_lost_rows)

    async def _run(self) -> None:
        while not self._is_closing:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._next_delay_s())
            except TimeoutError:
                pass
            self._wake.clear()
            if self._is_closing:
                return  # close() does the final flush
            try:
                await self.flush()
            except Exception:  # a bug here must not silently stop all logging
                logger.exception("unexpected error in the log writer task; continuing")
            self._report_dropped_rows()

    def _next_delay_s(self) -> float:
        if self._num_consecutive_failures == 0:
            return self._flush_interval_s
        exponent = min(self._num_consecutive_failures, 30)
        return min(self._flush_interval_s * 2**exponent, self._max_retry_delay_s)

    def _report_dropped_rows(self) -> None:
        if self._num_unreported_dropped_rows:
            logger.error(
                "dropped %d log rows because the buffer was full (%d in total)",
                self._num_unreported_dropped_rows,
                self._num_dropped_rows,
            )
            self._num_unreported_dropped_rows = 0

    # -- writing ---------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Write every row buffered at call time; True if all of them were written.

        On a database failure the rows stay buffered (False is returned, the failure counted).
        """
        async with self._write_lock:
            num_rows_to_write = len(self._buffer)
            while num_rows_to_write > 0 and self._buffer:
                chunk_size = min(self._max_batch_rows, num_rows_to_write, len(self._buffer))
                chunk = [self._buffer.popleft() for _ in range(chunk_size)]
                num_rows_to_write -= chunk_size
                if not await self._write_chunk(chunk):
                    return False
            return True

    async def _write_chunk(self, chunk: list[_Entry]) -> bool:
        """Write `chunk` in one transaction; on failure put back what was not written."""
        self._num_in_flight_rows = len(chunk)
        try:
            await self._insert(chunk)
        except BaseException as error:
            if isinstance(error, Exception) and is_bad_rows_error(error):
                return await self._write_rows_one_by_one(chunk)
            self._put_back(chunk)
            if not isinstance(error, Exception):
                raise  # cancelled: the rows are back in the buffer
            self._on_write_failure(error)
            return False
        self._num_in_flight_rows = 0
        self._on_write_success(len(chunk))
        return True

    async def _write_rows_one_by_one(self, chunk: list[_Entry]) -> bool:
        """Isolate the bad rows of `chunk`: each row in its own transaction."""
        for index, entry in enumerate(chunk):
            try:
                await self._insert([entry])
            except Exception as error:
                if not is_bad_rows_error(error):
                    self._put_back(chunk[index:])
                    self._on_write_failure(error)
                    return False
                self._num_in_flight_rows -= 1
                self._num_rejected_rows += 1
                logger.error(
                    "database rejected a %s row (id=%s); dropping it: %s",
                    entry[0].__tablename__,
                    entry[1].get("id"),
                    error,
                )
            else:
                self._num_in_flight_rows -= 1
                self._on_write_success(1)
        return True

    async def _insert(self, chunk: list[_Entry]) -> None:
        rows_by_model: dict[type[Base], list[dict[str, Any]]] = {}
        for model, row in chunk:
            rows_by_model.setdefault(model, []).append(row)
        async with self._session_factory() as session, session.begin():
            for model, rows in rows_by_model.items():
                await session.execute(insert(model), rows)

    def _put_back(self, entries: list[_Entry]) -> None:
        self._num_in_flight_rows = 0
        self._buffer.extendleft(reversed(entries))
        self._drop_oldest_over_capacity()

    def _on_write_success(self, num_rows: int) -> None:
        self._num_written_rows += num_rows
        if self._num_consecutive_failures:
            logger.warning(
                "log database writes recovered after %d failed attempts; %d rows still buffered",
                self._num_consecutive_failures,
                self.num_buffered_rows,
            )
            self._num_consecutive_failures = 0

    def _on_write_failure(self, error: Exception) -> None:
        self._num_write_failures += 1
        self._num_consecutive_failures += 1
        if self._num_consecutive_failures == 1:
            logger.warning(
                "log database write failed, keeping %d rows buffered and retrying with backoff "
                "(up to %.1f s): %s",
                self.num_buffered_rows,
                self._max_retry_delay_s,
                error,
            )


def checked_row(model: type[Base], row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `row` after checking it can be inserted into `model`'s table.

    Raises ValueError for unknown or missing required columns, naive datetimes and values outside
    a column's enum (status, outcome, ...), so a malformed row fails in the caller instead of
    poisoning a batch later.
    """
    columns = model.__table__.columns
    unknown = set(row) - set(columns.keys())
    if unknown:
        raise ValueError(f"unknown {model.__tablename__} columns: {sorted(unknown)}")
    missing = [name for name in _required_columns(model) if row.get(name) is None]
    if missing:
        raise ValueError(f"missing required {model.__tablename__} columns: {missing}")
    for name, value in row.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(f"{model.__tablename__}.{name} is a naive datetime; use aware UTC")
        column_type = columns[name].type
        if value is not None and isinstance(column_type, EnumText) and value not in set(column_type.enum_type):
            choices = [member.value for member in column_type.enum_type]
            raise ValueError(f"{model.__tablename__}.{name} must be one of {choices}, got {value!r}")
    return dict(row)


_required_columns_cache: dict[type[Base], tuple[str, ...]] = {}


def _required_columns(model: type[Base]) -> tuple[str, ...]:
    required = _required_columns_cache.get(model)
    if required is None:
        required = tuple(
            column.name
            for column in model.__table__.columns
            if not column.nullable
            and column.default is None
            and column.server_default is None
            and column.autoincrement is not True
        )
        _required_columns_cache[model] = required
    return required


def is_bad_rows_error(error: Exception) -> bool:
    """True when retrying the same rows cannot succeed: the rows, not the database, are at fault."""
    if isinstance(error, IntegrityError | DataError):
        return True
    if isinstance(error, DBAPIError):
        sqlstate = _sqlstate(error)
        return sqlstate is not None and sqlstate[:2] in _BAD_ROWS_SQLSTATE_CLASSES
    # Raised while compiling the statement or binding parameters, before reaching the database.
    return isinstance(error, StatementError | CompileError | TypeError | ValueError)


def _sqlstate(error: DBAPIError) -> str | None:
    # asyncpg maps most server errors to a generic DBAPI Error; its SQLSTATE is on the cause.
    candidates = [error.orig, error.__cause__, getattr(error.orig, "__cause__", None)]
    for candidate in candidates:
        sqlstate = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(sqlstate, str):
            return sqlstate
    return None
