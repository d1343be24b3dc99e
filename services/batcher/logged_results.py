"""Answers for retried request ids from the log DB, which outlives a batcher restart.

The in-memory idempotency index answers retries while the batcher lives; after a restart only the
log has the first call's result. Rows reach the log through the buffered writer (flushed every
~0.2 s), so a request that completed within that window before a crash can still run twice.

The logged row keeps the request itself (instruction, input, max_new_tokens), so its request hash
is computed from the row with the same function as a live request's: no column of its own, and
rows logged before idempotency keys were bound to requests are checked too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.batcher.domain import RequestResult, request_sha256
from services.shared.db import find_completed_request


def make_logged_result_lookup(
    session_factory: async_sessionmaker[AsyncSession],
) -> Callable[[str, str], Awaitable[tuple[RequestResult, str] | None]]:
    """lookup(tenant, client_request_id): the first completed result under that key and the
    request_sha256 of the request it answered, or None."""

    async def lookup(tenant_id: str, client_request_id: str) -> tuple[RequestResult, str] | None:
        async with session_factory() as session:
            found = await find_completed_request(session, tenant_id, client_request_id)
        if found is None:
            return None
        row, batch_size = found
        if row.output_text is None or row.started_at is None or row.finished_at is None:
            return None  # logged before results were kept: it cannot be answered, so it runs
        result = RequestResult(
            request_id=row.id,
            text=row.output_text,
            generated_tokens=row.generated_tokens or 0,
            predicted_tokens=row.predicted_tokens or 0,
            input_tokens=row.input_tokens,
            batch_id=row.batch_id or "",
            batch_size=batch_size or 0,
            queued_at=row.arrived_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            is_prediction_fallback=row.is_prediction_fallback,
        )
        return result, request_sha256(row.instruction, row.input_text, row.max_new_tokens)

    return lookup
