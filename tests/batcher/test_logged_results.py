"""The log DB's answers to retried idempotency keys (services/batcher/logged_results.py), on SQLite and
PostgreSQL: concurrent lookups share queries and each gets its own key's first logged answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
from sqlalchemy import event

from services.batcher.logged_results import MAX_KEYS_PER_QUERY, LoggedResultLookup
from services.shared.db import RequestRow
from services.shared.db.models import BatchRow
from tests.databases import migrated_log_db

NOW = datetime.now(UTC)


def _row(seq_id: int, tenant: str, key: str, text: str | None, batch_id: str | None = None,
         status: str = "completed") -> RequestRow:
    return RequestRow(
        id=f"00000000-0000-0000-0000-{seq_id:012d}", client_request_id=key, tenant_id=tenant, instruction="",
        input_text=f"input of {key}", input_tokens=5, max_new_tokens=4, predicted_tokens=3,
        is_prediction_fallback=False, generated_tokens=2, output_text=text, batch_id=batch_id, status=status,
        arrived_at=NOW - timedelta(seconds=2), started_at=NOW - timedelta(seconds=1), finished_at=NOW,
    )


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def log(request, tmp_path):
    """(session factory, engine) of a migrated log DB holding the rows the tests look up."""
    async with migrated_log_db(request.param, tmp_path) as (engine, session_factory):
        async with session_factory() as session, session.begin():
            session.add(BatchRow(id="batch-7", size=7, input_tokens_max=5, predicted_gen_tokens_max=3, outcome="ok"))
            session.add_all([
                _row(1, "acme", "twice", "first answer", batch_id="batch-7"),
                _row(2, "acme", "twice", "second answer"),
                _row(3, "beta", "twice", "beta's answer"),
                _row(4, "acme", "failed", None, status="failed"),
                _row(5, "acme", "no-text", None),  # logged before results were kept
                *[_row(100 + i, "acme", f"k{i}", f"answer {i}") for i in range(300)],
            ])
        yield session_factory, engine


@pytest.mark.asyncio
async def test_concurrent_lookups_share_queries_and_each_gets_its_keys_first_answer(log):
    session_factory, engine = log
    selects = []
    event.listen(engine.sync_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: selects.append(statement) if statement.lstrip().upper()
                 .startswith("SELECT") else None)
    lookup = LoggedResultLookup(session_factory)
    keys = [("acme", "twice"), ("beta", "twice"), ("gamma", "twice"), ("acme", "failed"), ("acme", "no-text"),
            ("acme", "never")] + [("acme", f"k{i}") for i in range(300)]
    answers = await asyncio.gather(*(lookup(tenant, key) for tenant, key in keys))

    found = {key: None if answer is None else answer[0] for key, answer in zip(keys, answers, strict=True)}
    assert found[("acme", "twice")].text == "first answer" and found[("acme", "twice")].batch_size == 7
    assert found[("beta", "twice")].text == "beta's answer" and found[("beta", "twice")].batch_size == 0
    assert [found[k] for k in [("gamma", "twice"), ("acme", "failed"), ("acme", "no-text"), ("acme", "never")]] == [
        None] * 4, "another tenant's key, a failed request, one without its text, an unknown key: each runs"
    assert all(found[("acme", f"k{i}")].text == f"answer {i}" for i in range(300))
    # the first call queries alone, the 305 asked meanwhile in ceil(305 / 256) more; <= 2 SELECTs each
    assert len(selects) <= 2 * (1 + -(-(len(keys) - 1) // MAX_KEYS_PER_QUERY)) < len(keys)


@pytest.mark.asyncio
async def test_a_failing_database_fails_every_waiting_lookup_and_the_next_one_queries_again(log):
    session_factory, _ = log
    failures = iter([RuntimeError("the log DB blipped")])

    def flaky_factory():
        error = next(failures, None)
        if error is not None:
            raise error
        return session_factory()

    lookup = LoggedResultLookup(flaky_factory)
    results = await asyncio.gather(lookup("acme", "k1"), return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    answer = await lookup("acme", "k1")
    assert answer is not None and answer[0].text == "answer 1"


@pytest.mark.asyncio
async def test_a_hung_query_times_out_for_its_callers_and_does_not_hold_the_next(log):
    session_factory, _ = log
    hang = asyncio.Event()

    class Hanging:
        async def __aenter__(self):
            await hang.wait()  # never set: a stuck connection

        async def __aexit__(self, *exc):
            return False

    factories = iter([Hanging, session_factory])
    lookup = LoggedResultLookup(lambda: next(factories)(), timeout_s=0.2)
    stuck = asyncio.ensure_future(lookup("acme", "k1"))
    await asyncio.sleep(0)  # the first query is running (hung) when the second key is asked
    second = asyncio.ensure_future(lookup("acme", "k2"))
    with pytest.raises(TimeoutError):
        await stuck
    answer = await second
    assert answer is not None and answer[0].text == "answer 2"
