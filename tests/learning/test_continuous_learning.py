"""Continuous learning end to end, on PostgreSQL and on SQLite, with the five services as processes.

The predictor starts from a version that saw only translation; the traffic is detox and code
comments. The trainer (every 2 s here) takes the bad misses from the request log, retrains, and
pushes; later requests are predicted by the new version, with a much smaller error. Then the
worker is restarted 0.5 s per decode step slower (a change of batch-time behaviour) and the estimator learns it
the same way. The trainer is killed and restarted in the middle, and the final accounting shows
every logged row was used at most once. Every request, during all the swaps, must succeed.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid

import grpc
import pytest

from magnus.v1 import model_admin_pb2, model_admin_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.core.knn_model import BatchShape
from services.shared.db.models import RequestRow, utc_now
from services.trainer.config import TrainerSettings
from services.trainer.selection import is_held_back
from services.trainer.specs import make_specs
from tests.learning.support import (
    NORMAL_WORKER_ID,
    TIME_MISS_ABS_S,
    LearningStack,
    LogView,
    VersionWatch,
    capped,
    failures,
    mean_abs,
    send_spaced,
    serving_version,
    interleave,
    short_prompts,
    wait_for,
)

# The first test of the module on a pytest worker also starts the stack and times the session's
# calibration (2-3 minutes of setup on a busy machine), which the default 300 s would count.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PER_PHASE = 16  # requests per phase; phase C (the estimator's lesson) has twice as many
SLOW_LESSON = 2 * PER_PHASE
SPACING_S = 0.25  # between requests: the trainer's 2 s rounds fall inside the traffic
# The slow worker adds 0.5 s per decode step, and phases C and D generate at most
# SLOW_MAX_NEW_TOKENS: a slow batch takes ~3 s more than it did, large against the noise of a busy
# 2-core machine (where a step of the tiny model takes 0.05-0.25 s, so a batch's own time varies by
# a second with the load), and short enough that the slow phases do not pile up a long queue.
# (0.1 s a step was not: 4 phase D batches of ~1.9 s showed the live estimator only 12 % better;
# 0.25 s with 12 tokens was not either: the pre-slowdown estimator, which had seen larger batches
# take as long under load, was within 1 s of phase D's 6.2 s batches.)
SLOWDOWN_STEP_S = 0.5
SLOW_MAX_NEW_TOKENS = 6
SLOW_WORKER_ID = "worker-slow"
# On the slow worker arrivals outpace batches, so batches queue (and carry the estimator's
# estimate when leased) and are as large as the batcher's ceiling (conftest: BATCH_CEILING): the
# number of phase C batches the estimator learns from is set by the test, not by the machine's
# speed. (Without the ceiling a busy machine merged phase C into 4 batches of up to 14 requests,
# too few misses for the trainer to push a better estimator.)
SLOW_SPACING_S = 0.8
CATCH_UP_TIMEOUT_S = 60.0


async def retrain(target: str, kind: int) -> list[trainer_pb2.TrainingRound]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        return list((await stub.Retrain(trainer_pb2.RetrainRequest(kind=kind), timeout=120)).rounds)


async def wait_caught_up(view: LogView, kind: str, target: str, expected_ids: set[str]) -> None:
    """Until the rows `expected_ids` are logged, the trainer's watermark is past all of them, and
    the replica serves the latest pushed version."""

    async def caught_up() -> bool:
        rows = await (view.requests() if kind == "predictor" else view.batches())
        if not expected_ids <= {r.id for r in rows} or await view.watermark(kind) < rows[-1].seq:
            return False
        pushed = [v.version for v in await view.versions(kind) if v.is_pushed]
        return await serving_version(target) == pushed[-1]

    await wait_for(caught_up, CATCH_UP_TIMEOUT_S, f"the trainer to catch up with the {kind} log")


def batch_ids(outcomes) -> set[str]:
    return {o.response.batch_id for o in outcomes}


def request_ids(outcomes) -> set[str]:
    return {o.response.request_id for o in outcomes}


def test_models_learn_from_the_log_and_swap_without_failed_requests(learning_stack: LearningStack) -> None:
    asyncio.run(learn_from_traffic(learning_stack))


async def learn_from_traffic(ls: LearningStack) -> None:
    stack = ls.stack
    batcher, predictor, estimator = (stack.target(n) for n in ("batcher", "predictor", "estimator"))
    # Predictor phases A, B: detox and code comments; estimator phases C, D: detox (alike shapes).
    detox = short_prompts("detox", 2 * PER_PHASE + SLOW_LESSON)
    comments = short_prompts("code_comment", PER_PHASE)
    half = PER_PHASE // 2
    phases = [
        interleave(detox[:half], comments[:half]),
        interleave(detox[half:PER_PHASE], comments[half:]),
        capped(detox[PER_PHASE : PER_PHASE + SLOW_LESSON], SLOW_MAX_NEW_TOKENS),
        capped(detox[PER_PHASE + SLOW_LESSON :], SLOW_MAX_NEW_TOKENS),
    ]
    view = LogView(ls.database_url, ls.store_dir)
    watch = VersionWatch([predictor, estimator])
    watch.start()
    try:
        # Phase A: drifted traffic; the trainer retrains and pushes while requests are in flight.
        assert await serving_version(predictor) == 1
        phase_a = await send_spaced(batcher, phases[0], SPACING_S)
        assert failures(phase_a) == []
        await wait_caught_up(view, "predictor", predictor, request_ids(phase_a))

        # Phase B: fresh rows of the same tasks; the trainer is killed and restarted meanwhile.
        sending = asyncio.create_task(send_spaced(batcher, phases[1], SPACING_S))
        await asyncio.sleep(1.5)
        stack.kill("trainer")
        stack.start("trainer")
        await asyncio.to_thread(stack.wait_healthy, ("trainer",), 60)
        phase_b = await sending
        assert failures(phase_b) == []
        await wait_caught_up(view, "predictor", predictor, request_ids(phase_b))

        # The same requests, predicted by v1 (offline, from the store) and by what was live.
        rows = {r.id: r for r in await view.requests()}
        assert any(r.predictor_version == 1 for r in rows.values()), "v1 never served"
        later = [rows[i] for i in request_ids(phase_b)]
        assert all(r.predictor_version > 1 and not r.is_prediction_fallback for r in later)
        v1 = (await view.store.load("predictor", 1)).model
        by_v1 = v1.predict([r.instruction for r in later], [r.input_text for r in later], [r.input_tokens for r in later])
        mae_v1 = mean_abs([(float(p), r.generated_tokens) for p, r in zip(by_v1, later, strict=True)])
        mae_live = mean_abs([(r.predicted_tokens, r.generated_tokens) for r in later])
        print(f"[{ls.backend}] predictor MAE on phase B ({len(later)} requests): v1 {mae_v1:.1f} tokens, "
              f"live v{min(r.predictor_version for r in later)}-v{max(r.predictor_version for r in later)} "
              f"{mae_live:.1f} tokens")
        assert mae_live < 0.5 * mae_v1

        # Phases C, D: the worker comes back slower; the estimator must learn that.
        await wait_caught_up(view, "estimator", estimator, batch_ids(phase_a) | batch_ids(phase_b))
        await asyncio.to_thread(stack.stop, "worker")
        stack.start(
            "worker",
            {"MAGNUS_WORKER_SLOWDOWN_STEP_S": str(SLOWDOWN_STEP_S), "MAGNUS_WORKER_WORKER_ID": SLOW_WORKER_ID},
        )
        await asyncio.to_thread(stack.wait_healthy, ("worker",), 60)
        estimator_before = await serving_version(estimator)
        phase_c = await send_spaced(batcher, phases[2], SLOW_SPACING_S)
        assert failures(phase_c) == []
        await wait_caught_up(view, "estimator", estimator, batch_ids(phase_c))
        assert await serving_version(estimator) > estimator_before
        phase_d = await send_spaced(batcher, phases[3], SLOW_SPACING_S)
        assert failures(phase_d) == []
        await wait_for(
            lambda: _logged(view, batch_ids(phase_d), request_ids(phase_d)), 30, "phase D's log rows"
        )

        # Phase D's batches: the estimate that was live vs what the pre-slowdown version says.
        batches = {b.id: b for b in await view.batches()}
        # A batch leased the moment it opened carries the batcher's fallback guess (no version).
        later_batches = [batches[i] for i in batch_ids(phase_d) if batches[i].estimator_version is not None]
        assert len(later_batches) >= 3
        assert all(b.worker_id == SLOW_WORKER_ID and b.estimator_version > estimator_before for b in later_batches)
        old_model = (await view.store.load("estimator", estimator_before)).model
        by_old = old_model.predict(
            [BatchShape(b.size, b.input_tokens_max, b.predicted_gen_tokens_max) for b in later_batches]
        )
        error_old_s = mean_abs([(float(e), b.actual_s) for e, b in zip(by_old, later_batches, strict=True)])
        error_live_s = mean_abs([(b.estimated_s, b.actual_s) for b in later_batches])
        print(f"[{ls.backend}] estimator mean |error| on phase D ({len(later_batches)} batches, mean "
              f"{statistics.fmean(b.actual_s for b in later_batches):.2f} s): v{estimator_before} {error_old_s:.2f} s, "
              f"live v{min(b.estimator_version for b in later_batches)}+ {error_live_s:.2f} s")
        # Only bad misses join the training set (the paper's rule), so the pre-slowdown samples
        # near the same shapes still pull the KNN down: the fall is real but not complete.
        assert error_live_s < 0.75 * error_old_s

        # Drain what is left, then account: every logged row trained at most once, in order.
        await retrain(stack.target("trainer"), trainer_pb2.MODEL_KIND_UNSPECIFIED)
        await assert_each_row_counted_once(view)
        all_requests = await view.requests()
        batches = await view.batches()
        assert len(all_requests) == 3 * PER_PHASE + SLOW_LESSON
        assert {r.status for r in all_requests} == {"completed"}
        assert {b.worker_id for b in batches} == {NORMAL_WORKER_ID, SLOW_WORKER_ID}
    finally:
        await watch.stop()
        await view.close()
    for target, seen in watch.seen.items():
        assert seen == sorted(seen), f"{target} went back to an older version: {seen}"
    assert len(set(watch.seen[predictor])) >= 2 and len(set(watch.seen[estimator])) >= 2


async def _logged(view: LogView, batch_ids_: set[str], request_ids_: set[str]) -> bool:
    batches = {b.id for b in await view.batches()}
    requests = {r.id for r in await view.requests()}
    return batch_ids_ <= batches and request_ids_ <= requests


async def assert_each_row_counted_once(view: LogView) -> None:
    """The samples the stored versions say they added are exactly what the trainer's selection
    takes from the log (bad misses, and rows of instructions the versions had few samples of).

    Uses the trainer's own row reading and selection over the WHOLE log, from the first version's
    samples: if a restart re-read rows, the versions would claim more samples; if it skipped rows,
    fewer.
    """
    specs = make_specs(TrainerSettings(time_miss_abs_s=TIME_MISS_ABS_S))
    for kind, spec in specs.items():
        async with view.store.session_factory() as session:
            logged = await spec.fetch(session, 0, None)
        trained = [v for v in await view.versions(kind) if "num_samples_added" in v.metrics]
        assert trained, f"no {kind} version was trained"
        added = sum(v.metrics["num_samples_added"] for v in trained)
        first = await view.store.load(kind, 1)
        assert added == len(spec.select(logged, first.model.samples)), kind
        seq_through = [v.metrics["log_seq_through"] for v in trained]
        assert seq_through == sorted(set(seq_through)), f"{kind} versions re-read rows: {seq_through}"
        assert await view.watermark(kind) == logged[-1].seq
        assert [v.version for v in await view.versions(kind)] == list(range(1, len(await view.versions(kind)) + 1))


def test_worse_candidate_is_stored_but_not_pushed(learning_stack: LearningStack) -> None:
    asyncio.run(worse_candidate(learning_stack))


async def worse_candidate(ls: LearningStack) -> None:
    predictor, trainer = ls.stack.target("predictor"), ls.stack.target("trainer")
    view = LogView(ls.database_url, ls.store_dir)
    try:
        await retrain(trainer, trainer_pb2.MODEL_KIND_PREDICTOR)  # nothing else in the next round
        serving = await view.store.load("predictor", only_pushed=True)
        assert await serving_version(predictor) == serving.info.version
        latest_version = (await view.versions("predictor"))[-1].version  # earlier tests' unpushed ones too
        await add_misleading_rows(view, serving.model, serving.info.version)

        rounds = await retrain(trainer, trainer_pb2.MODEL_KIND_PREDICTOR)

        # the rows landed in one transaction, so one round fitted them: this Retrain's, or a periodic
        # round that ran first (every TRAINER_PERIOD_S; then this one found "no new log rows")
        newer = [v for v in await view.versions("predictor") if v.version > latest_version]
        assert len(newer) == 1, (rounds, newer)
        (candidate,) = newer
        assert not candidate.is_pushed
        assert f"worse than serving v{serving.info.version}" in (candidate.note or "")
        if rounds[0].new_version:  # Retrain's own round fitted them: its answer says what it decided
            assert rounds[0].new_version == candidate.version and not rounds[0].is_pushed
            assert f"worse than serving v{serving.info.version}" in rounds[0].note
        assert await serving_version(predictor) == serving.info.version
        async with grpc.aio.insecure_channel(predictor) as channel:  # "latest" means latest pushed
            stub = model_admin_pb2_grpc.ModelAdminServiceStub(channel)
            loaded = await stub.LoadModel(model_admin_pb2.LoadModelRequest(version=0), timeout=30)
        assert loaded.model.version == serving.info.version
        assert f"v{candidate.version} not pushed" in ls.stack.log_path("trainer").read_text()
    finally:
        await view.close()


async def add_misleading_rows(view: LogView, serving_model, serving_version_: int, num_rows: int = 40) -> None:
    """Rows of a new app: the trainable ones are 300 tokens off, the held-back ones (every 5th seq)
    are exactly what the serving model predicts. A candidate fitted on them is measurably worse."""
    instruction = "Answer with one word:"
    async with view.store.session_factory() as session, session.begin():
        for i in range(num_rows):
            text, input_tokens = f"question {i}", 20 + i
            predicted = max(1, round(float(serving_model.predict([instruction], [text], [input_tokens])[0])))
            row = RequestRow(
                id=str(uuid.uuid4()), instruction=instruction, input_text=text, input_tokens=input_tokens,
                max_new_tokens=512, predicted_tokens=predicted, predictor_version=serving_version_,
                generated_tokens=predicted, status="completed", arrived_at=utc_now(),
            )
            session.add(row)
            await session.flush()  # assigns seq, which decides trainable vs held back
            if not is_held_back(row.seq, TrainerSettings().holdout_every):
                row.generated_tokens = predicted + 300
            await session.flush()
