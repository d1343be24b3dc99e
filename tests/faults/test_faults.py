"""Fault injection on real processes: every request completes exactly once or gets a clear status.

The module's stack (conftest.py) has 3 s leases and a worker slowed to > 1 s per batch; each test
breaks one part, counts what the clients got, checks the log DB, and leaves the stack healthy.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import grpc
import pytest

from magnus.v1 import generation_pb2_grpc
from tests.faults.support import (
    assert_completed_exactly_once,
    batch_outcomes,
    generate,
    generate_all,
    metric_value,
    new_ids,
    request_rows,
    sqlite_path,
    wait_for_metric,
)

pytestmark = pytest.mark.integration


def test_worker_killed_mid_batch_its_batch_is_requeued_and_completes_once(fault_stack):
    client_ids = new_ids(6, "worker-kill")
    batches_before = {batch_id for batch_id, _ in batch_outcomes(fault_stack.database_url)}

    async def scenario():
        calls = asyncio.ensure_future(generate_all(fault_stack.target("batcher"), client_ids, timeout_s=90))
        leased = await wait_for_metric(fault_stack.metrics_url("batcher"), "magnus_leased_batches", 1)
        assert leased >= 1, "no batch was leased"
        fault_stack.kill("worker")  # SIGKILL while the batch runs: no failure report, no goodbye
        await asyncio.to_thread(fault_stack.start, "worker")
        return await calls

    outcomes = asyncio.run(scenario())
    fault_stack.wait_healthy(("worker",))
    assert outcomes.num_answered == len(client_ids)
    assert outcomes.errors == {}, "a dead worker's batch must be requeued, not failed"
    assert_completed_exactly_once(fault_stack.database_url, outcomes)
    new_batches = [o for b, o in batch_outcomes(fault_stack.database_url) if b not in batches_before]
    assert "lost" in new_batches, f"the expired lease is logged as lost: {new_batches}"


def test_predictor_killed_requests_use_the_fallback_and_recover_after_restart(fault_stack):
    fault_stack.kill("predictor")
    client_ids = new_ids(4, "predictor-down")
    outcomes = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids))
    assert outcomes.errors == {}
    assert all(r.is_prediction_fallback for r in outcomes.responses.values())
    assert_completed_exactly_once(fault_stack.database_url, outcomes)

    fault_stack.start("predictor")
    fault_stack.wait_healthy(("predictor",))

    async def until_predicted() -> list:
        async with grpc.aio.insecure_channel(fault_stack.target("batcher")) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            answers = []
            deadline_s = time.monotonic() + 60
            while time.monotonic() < deadline_s:
                answers.append(await generate(stub, new_ids(1, "predictor-back")[0], max_new_tokens=4))
                if not isinstance(answers[-1], grpc.StatusCode) and not answers[-1].is_prediction_fallback:
                    break
                await asyncio.sleep(0.5)  # the channel's reconnect backoff decides when it is seen
            return answers

    answers = asyncio.run(until_predicted())
    assert all(not isinstance(a, grpc.StatusCode) for a in answers), answers
    assert not answers[-1].is_prediction_fallback, "the batcher went back to the predictor after its restart"
    assert answers[-1].predicted_tokens >= 1


async def busy_then_queued(target: str, client_ids: list[str]) -> dict:
    first = asyncio.ensure_future(generate_all(target, client_ids[:1]))
    await asyncio.sleep(0.3)
    rest = await generate_all(target, client_ids[1:])
    return {**(await first).errors, **rest.errors}


def test_estimator_killed_batches_still_run_and_it_is_used_again_after_restart(fault_stack):
    fault_stack.kill("estimator")
    client_ids = new_ids(4, "estimator-down")
    outcomes = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids))
    assert outcomes.errors == {}, "HRRN falls back to its own guess; serving must not depend on the estimator"
    assert_completed_exactly_once(fault_stack.database_url, outcomes)
    estimated_before = metric_value(fault_stack.metrics_url("batcher"), "magnus_batch_time_estimate_error_seconds_count")

    fault_stack.start("estimator")
    fault_stack.wait_healthy(("estimator",))
    deadline_s = time.monotonic() + 60
    estimated_after = estimated_before
    while estimated_after <= estimated_before and time.monotonic() < deadline_s:
        # Only a batch that waits in the queue gets an estimate (an idle worker takes one at once):
        # one request occupies the worker (> 1 s with the slowdown hook), then three queue behind it.
        errors = asyncio.run(busy_then_queued(fault_stack.target("batcher"), new_ids(4, "estimator-back")))
        assert errors == {}
        estimated_after = metric_value(fault_stack.metrics_url("batcher"), "magnus_batch_time_estimate_error_seconds_count")
    assert estimated_after > estimated_before, "batches are estimated by the estimator again after its restart"


def test_log_db_locked_serving_continues_and_rows_are_written_after(fault_stack):
    """A writer holding the SQLite file exclusively stands in for a DB that is down."""
    blocker = sqlite3.connect(sqlite_path(fault_stack.database_url), timeout=30, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    client_ids = new_ids(4, "db-down")
    try:
        outcomes = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids))
        assert outcomes.errors == {}, "serving must not depend on the log DB"
        buffered = metric_value(fault_stack.metrics_url("batcher"), "magnus_log_buffered_rows")
        assert buffered >= len(client_ids), "the unwritten rows are kept and visible in a metric"
        marks = ",".join("?" * len(client_ids))
        written = blocker.execute(f"SELECT count(*) FROM requests WHERE client_request_id IN ({marks})", client_ids)
        assert written.fetchone()[0] == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert_completed_exactly_once(fault_stack.database_url, outcomes)
    assert metric_value(fault_stack.metrics_url("batcher"), "magnus_log_dropped_rows") == 0


def test_batcher_killed_clients_get_unavailable_and_a_retry_runs_once(fault_stack):
    client_ids = new_ids(6, "batcher-kill")

    async def scenario():
        calls = asyncio.ensure_future(generate_all(fault_stack.target("batcher"), client_ids, timeout_s=60))
        assert await wait_for_metric(fault_stack.metrics_url("batcher"), "magnus_leased_batches", 1) >= 1
        fault_stack.kill("batcher")
        killed_s = time.monotonic()
        outcomes = await calls
        return outcomes, time.monotonic() - killed_s

    outcomes, answered_after_s = asyncio.run(scenario())
    assert outcomes.responses == {}
    assert set(outcomes.errors.values()) == {grpc.StatusCode.UNAVAILABLE}, outcomes.errors
    assert answered_after_s < 5.0, "clients learn promptly that the batcher is gone"

    fault_stack.start("batcher")
    fault_stack.wait_healthy(("batcher",))
    # The queue lived in memory: the documented contract is "retry with the same client_request_id".
    retried = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids, timeout_s=90))
    assert retried.errors == {}, "the worker re-registers with the new batcher and runs the retries"
    assert_completed_exactly_once(fault_stack.database_url, retried)
    rows = request_rows(fault_stack.database_url, client_ids)
    assert len(rows) == len(client_ids), f"the killed batcher logged nothing it did not deliver: {rows}"


def test_retry_after_a_batcher_restart_gets_the_logged_answer_not_a_second_run(fault_stack):
    client_ids = new_ids(3, "answered-then-crash")
    first = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids))
    assert first.errors == {}
    deadline_s = time.monotonic() + 30
    while len(request_rows(fault_stack.database_url, client_ids)) < len(client_ids):  # buffered writer
        assert time.monotonic() < deadline_s, "the answered requests never reached the log"
        time.sleep(0.2)

    fault_stack.kill("batcher")  # the in-memory idempotency index is gone with it
    fault_stack.start("batcher")
    fault_stack.wait_healthy(("batcher",))
    again = asyncio.run(generate_all(fault_stack.target("batcher"), client_ids))

    assert again.errors == {}
    for client_id in client_ids:
        assert again.responses[client_id].request_id == first.responses[client_id].request_id
        assert again.responses[client_id].text == first.responses[client_id].text
    assert len(request_rows(fault_stack.database_url, client_ids)) == len(client_ids), "nothing ran twice"


def test_batcher_sigterm_drains_in_flight_requests_and_refuses_new_ones(fault_stack):
    client_ids = new_ids(4, "batcher-term")

    async def scenario():
        target = fault_stack.target("batcher")
        calls = asyncio.ensure_future(generate_all(target, client_ids, timeout_s=60))
        # every request admitted before the SIGTERM (one still in flight when it lands is rightly refused:
        # seen on a clean-clone CI run), and a batch of them running
        metrics = fault_stack.metrics_url("batcher")
        assert await wait_for_metric(metrics, "magnus_pending_requests", len(client_ids)) >= len(client_ids)
        assert await wait_for_metric(metrics, "magnus_leased_batches", 1) >= 1
        fault_stack.processes["batcher"].terminate()
        await asyncio.sleep(0.2)
        late = await generate_all(target, new_ids(1, "late"), timeout_s=10)
        return await calls, late

    outcomes, late = asyncio.run(scenario())
    fault_stack.processes["batcher"].wait(30)
    assert outcomes.errors == {}, "queued and running requests finish during the drain"
    assert set(late.errors.values()) == {grpc.StatusCode.UNAVAILABLE}
    assert_completed_exactly_once(fault_stack.database_url, outcomes)
    fault_stack.start("batcher")
    fault_stack.wait_healthy(("batcher",))
    again = asyncio.run(generate_all(fault_stack.target("batcher"), new_ids(2, "after-term"), timeout_s=90))
    assert again.errors == {}
