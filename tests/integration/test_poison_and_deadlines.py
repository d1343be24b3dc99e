"""One bad request never fails its neighbours; callers who leave take their work with them; a
restarted worker gets its batch back at once. Real processes: a batcher and one worker on the tiny
model (context 4096 tokens), no predictor or estimator (fallback predictions and estimates).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import urllib.request

import grpc
import pytest

from magnus.v1 import generation_pb2, generation_pb2_grpc
from tests.faults.support import batch_outcomes, new_ids, prompt, sqlite_path, wait_for_metric, wait_for_rows
from tests.stack_support import assert_no_asyncio_errors, running_stack

pytestmark = pytest.mark.integration

LEASE_S = 120.0  # long: a restarted worker must get its batch back long before the lease would expire
SERVICES = ("batcher", "worker")
STAGES = ("queued", "running")
BASE_ENV = {
    "MAGNUS_BATCHER_LEASE_S": str(LEASE_S),
    "MAGNUS_BATCHER_HEARTBEAT_INTERVAL_S": "0.5",
    "MAGNUS_BATCHER_PREDICTOR_DEADLINE_S": "0.3",  # no predictor runs: the fallback after 0.3 s
    "MAGNUS_BATCHER_DRAIN_TIMEOUT_S": "5",
    "MAGNUS_WORKER_PULL_WAIT_S": "1",
    "MAGNUS_WORKER_BACKOFF_MAX_S": "1",
}


@pytest.fixture(scope="module")
def static_stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("poison"), SERVICES, env={
        **BASE_ENV,
        "MAGNUS_WORKER_WORKER_ID": "restartable-worker",
        "MAGNUS_BATCHER_POLICY": "vs",  # batches of 4: a queue of several batches forms under load
        "MAGNUS_BATCHER_FIXED_BATCH_SIZE": "4",
        # test hook: each decode step 0.05 s slower, so a batch runs > 1 s (killable mid-way, and a queue forms)
        "MAGNUS_WORKER_SLOWDOWN_STEP_S": "0.05",
    }) as stack:
        yield stack
    assert_no_asyncio_errors(stack, SERVICES)


@pytest.fixture(scope="module")
def continuous_stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("continuous"), SERVICES, env={
        **BASE_ENV,
        "MAGNUS_BATCHER_POLICY": "ccb",
        "MAGNUS_WORKER_MODE": "continuous",
        "MAGNUS_WORKER_CONTINUOUS_SLOTS": "1",  # one row: a request still decoding blocks the next one
        "MAGNUS_WORKER_TRACE_REPLAY": "true",  # every request runs to its max_new_tokens
    }) as stack:
        yield stack
    assert_no_asyncio_errors(stack, SERVICES)


def labelled_metric(url: str, name: str, **labels: str) -> float:
    """One sample from a /metrics page, matched by name and labels (0 if absent)."""
    with urllib.request.urlopen(url, timeout=5) as page:
        for line in page.read().decode().splitlines():
            match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
            if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")) == labels:
                return float(match.group(2))
    return 0.0


async def call(stub, client_id: str, max_new_tokens: int, timeout_s: float):
    """(status code, details, trailing metadata) of one Generate call; OK carries the response as details."""
    try:
        response = await stub.Generate(
            generation_pb2.GenerateRequest(prompt=prompt(client_id, max_new_tokens=max_new_tokens)), timeout=timeout_s)
        return grpc.StatusCode.OK, response, {}
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details(), dict(error.trailing_metadata() or ())


async def calls(target: str, specs: list[tuple[str, int, float]]):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        return await asyncio.gather(*(call(stub, cid, n, t) for cid, n, t in specs))


def statuses(database_url: str, client_ids: list[str]) -> dict[str, tuple[str, float | None]]:
    """client id -> (logged status, seconds from admission to its answer or None)."""
    with sqlite3.connect(sqlite_path(database_url), timeout=30) as db:
        marks = ",".join("?" * len(client_ids))
        rows = db.execute(
            "SELECT client_request_id, status, (julianday(finished_at) - julianday(arrived_at)) * 86400.0 "
            f"FROM requests WHERE client_request_id IN ({marks})", client_ids)
        return {cid: (status, run_s) for cid, status, run_s in rows.fetchall()}


def test_a_request_longer_than_the_worker_context_fails_alone_and_its_20_neighbours_answer(static_stack):
    short_ids, long_id = new_ids(20, "neighbour"), new_ids(1, "too-long")[0]
    specs = [(cid, 16, 120.0) for cid in short_ids] + [(long_id, 4095, 120.0)]
    outcomes = dict(zip([s[0] for s in specs], asyncio.run(calls(static_stack.target("batcher"), specs)), strict=True))
    code, details, _ = outcomes[long_id]
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith("prompt.max_new_tokens") and "4096" in details
    assert [outcomes[cid][0] for cid in short_ids] == [grpc.StatusCode.OK] * 20


def test_a_restarted_worker_gets_its_batch_back_long_before_the_lease_expires(static_stack):
    client_ids = new_ids(6, "restart")
    batches_before = {batch_id for batch_id, _ in batch_outcomes(static_stack.database_url)}

    async def scenario():
        answers = asyncio.ensure_future(calls(static_stack.target("batcher"), [(c, 24, 150.0) for c in client_ids]))
        leased = await wait_for_metric(static_stack.metrics_url("batcher"), "magnus_leased_batches", 1)
        assert leased >= 1, "no batch was leased"
        static_stack.kill("worker")  # SIGKILL mid-batch: no failure report, its lease would run 120 s
        killed_s = time.monotonic()
        await asyncio.to_thread(static_stack.start, "worker")  # the same MAGNUS_WORKER_WORKER_ID
        return await answers, time.monotonic() - killed_s

    outcomes, answered_after_s = asyncio.run(scenario())
    static_stack.wait_healthy(("worker",))
    assert [code for code, _, _ in outcomes] == [grpc.StatusCode.OK] * len(client_ids)
    assert answered_after_s < LEASE_S / 2, f"answered {answered_after_s:.0f} s after the kill"
    new_outcomes = [o for b, o in batch_outcomes(static_stack.database_url) if b not in batches_before]
    assert "lost" in new_outcomes and "ok" in new_outcomes, new_outcomes
    assert "restarted while running batch" in static_stack.log_path("batcher").read_text()


def test_short_deadlines_under_load_are_refused_at_once_or_answered_and_never_run_for_nobody(static_stack):
    target, metrics_url = static_stack.target("batcher"), static_stack.metrics_url("batcher")
    for client_id in new_ids(3, "warm"):  # one batch at a time: the batcher learns how slow this worker is
        started_s = time.monotonic()
        asyncio.run(calls(target, [(client_id, 24, 120.0)]))
        alone_s = time.monotonic() - started_s  # the last: a request alone, as this machine runs it now
    # The scenario in units of this machine's speed: on an idle one a request alone takes ~1 s and the
    # deadlines are 4 s; a busy machine gets proportionally longer deadlines and gaps, so the same
    # requests are refused, met or late whatever its speed (with fixed 4 s, every one was refused)
    deadline_s = max(4.0, 4.0 * alone_s)
    scale = deadline_s / 4.0
    cancelled_before = {s: labelled_metric(metrics_url, "magnus_cancelled_requests_total", stage=s) for s in STAGES}
    # every request is 24 tokens, as predicted (the fallback predicts as many out as in): the test is
    # about the queue, not about prediction error
    load_ids = new_ids(8, "load")  # a backlog: 2 batches of 4, ~1.5 s each on an idle machine, no deadline
    deadline_ids = new_ids(30, "deadline")  # one every deadline / 16, each willing to wait its deadline

    async def scenario():
        load = asyncio.ensure_future(calls(target, [(c, 24, 300.0 * scale) for c in load_ids]))
        await asyncio.sleep(0.5 * scale)
        short = []
        for client_id in deadline_ids:
            short.append(asyncio.ensure_future(calls(target, [(client_id, 24, deadline_s)])))
            await asyncio.sleep(0.25 * scale)
        return [answer for answers in await asyncio.gather(*short) for answer in answers], await load

    short, load = asyncio.run(scenario())
    codes = [code for code, _, _ in short]
    assert [code for code, _, _ in load] == [grpc.StatusCode.OK] * len(load_ids)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
    refused = [(details, trailers) for code, details, trailers in short if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused, f"a backlog of ~3 requests alone leaves no room for {deadline_s:.1f} s deadlines at first: some must be refused ({codes})"
    assert all(float(trailers["retry-after-s"]) > 0 and "estimated queue wait" in details for details, trailers in refused)
    assert grpc.StatusCode.OK in codes, f"once the backlog drained, short deadlines are met ({codes})"
    num_late = codes.count(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert num_late <= len(codes) // 4, f"admission let {num_late} of {len(codes)} in that could not make it: {codes}"

    # every caller that left: its request was dropped (logged cancelled, counted), or it had ended as
    # the deadline passed (the answer and the deadline crossed on the wire): none ran on for nobody
    late_ids = [cid for cid, code in zip(deadline_ids, codes, strict=True) if code == grpc.StatusCode.DEADLINE_EXCEEDED]
    wait_for_rows(static_stack.database_url, late_ids, len(late_ids))
    logged = statuses(static_stack.database_url, late_ids)
    assert set(logged) == set(late_ids) and {status for status, _ in logged.values()} <= {"cancelled", "completed"}, logged
    crossed = [cid for cid, (status, run_s) in logged.items() if status == "completed"]
    assert all(logged[cid][1] < deadline_s for cid in crossed), f"completed after its caller left: {logged}"
    cancelled = sum(labelled_metric(metrics_url, "magnus_cancelled_requests_total", stage=s) - cancelled_before[s]
                    for s in STAGES)
    assert cancelled == num_late - len(crossed)


def test_a_running_request_whose_caller_left_stops_decoding_and_frees_its_row(continuous_stack):
    target = continuous_stack.target("batcher")
    worker_metrics, batcher_metrics = continuous_stack.metrics_url("worker"), continuous_stack.metrics_url("batcher")

    async def scenario():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            # ~2,000 decode steps alone on the one row: tens of seconds on a CPU
            long = stub.GenerateStream(generation_pb2.GenerateStreamRequest(
                prompt=prompt(new_ids(1, "long")[0], max_new_tokens=2000)), timeout=300)
            phases = [(await long.read()).phase, (await long.read()).phase]
            assert phases == [generation_pb2.REQUEST_PHASE_QUEUED, generation_pb2.REQUEST_PHASE_STARTED]
            await asyncio.sleep(1.0)  # decoding
            long.cancel()
            left_s = time.monotonic()
            code, response, _ = await call(stub, new_ids(1, "next")[0], 4, 120.0)
            return code, response, time.monotonic() - left_s

    code, response, next_answered_s = asyncio.run(scenario())
    assert code == grpc.StatusCode.OK and response.generated_tokens == 4
    # the row freed within a heartbeat or two; decoding the long request out would have taken far longer
    assert next_answered_s < 10.0, f"the next request waited {next_answered_s:.1f} s for the row"
    assert labelled_metric(worker_metrics, "magnus_worker_cancelled_requests_total") == 1
    # one row: had the long request decoded on, its 2,000 steps would all have run before the next one's
    assert labelled_metric(worker_metrics, "magnus_worker_continuous_steps_total") < 2000
    assert labelled_metric(batcher_metrics, "magnus_cancelled_requests_total", stage="running") == 1
