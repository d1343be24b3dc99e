"""Speculative decoding by prompt lookup (services/worker/paged/speculation.py) on the paged engine: drafts
change how many steps a request takes, never its tokens (greedy, tiny models, CPU), with the overlap on or
off, beside stop tokens, lengths and preemption; and every block comes back."""

from __future__ import annotations

import copy

import pytest
import torch

from services.worker.paged import attention
from services.worker.paged.engine import PagedEngine
from services.worker.paged.reference_runner import Reference, ReferenceRunner
from services.worker.paged.runner import ModelRunner
from services.worker.paged.scheduler import FinishReason, PreemptRule, SchedulerConfig
from services.worker.paged.speculation import NgramIndex, accepted_tokens
from tests.worker.test_paged_engine import alone, engine_for, prompts, run_all, tiny_model  # noqa: F401


def index_of(tokens, **options) -> NgramIndex:
    index = NgramIndex(**options)
    index.extend(tokens)
    return index


def test_the_index_proposes_what_followed_the_longest_latest_match():
    # the tail (7, 8) occurred twice: the latest occurrence's followers win
    assert index_of([7, 8, 1, 2, 3, 7, 8, 4, 5, 6, 7, 8]).propose(3) == (4, 5, 6)
    # no trigram match: the bigram (8, 9) decides, even though (9,) alone occurred later elsewhere
    assert index_of([8, 9, 5, 5, 9, 6, 0, 8, 9]).propose(2) == (5, 5)
    assert index_of([1, 2, 3, 4]).propose(3) == ()  # the tail occurred nowhere before
    assert index_of([1, 2, 1]).propose(5) == (2, 1)  # what follows runs up to the end, no further
    assert index_of([1, 2, 1]).propose(0) == ()
    # built in pieces or at once: the same index
    pieces = NgramIndex()
    for token in [5, 6, 7, 5, 6]:
        pieces.extend([token])
    assert pieces.propose(4) == index_of([5, 6, 7, 5, 6]).propose(4) == (7, 5, 6)
    assert index_of([4, 4, 4], min_ngram=2, max_ngram=2).propose(2) == (4,)
    with pytest.raises(ValueError):
        NgramIndex(max_ngram=1, min_ngram=2)


def test_accepted_tokens_keep_the_agreeing_drafts_and_the_models_next():
    assert accepted_tokens([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all drafts stand, plus a bonus token
    assert accepted_tokens([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the first disagreement is the model's own
    assert accepted_tokens([5, 6], [4, 6, 1]) == [4]
    assert accepted_tokens([], [3]) == [3]
    with pytest.raises(ValueError):
        accepted_tokens([1, 2], [1, 2])


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


def copy_workload(num: int = 8, seed: int = 3):
    """Prompts that hold their own answer: a random text, then the request's reference output, a copy
    of a span of it with one token changed (as a bug fix or a grammar correction would), so prompt
    lookup finds long runs. (prompt, reference) pairs."""
    work = []
    for i, text in enumerate(prompts(num, seed=seed, low=12, high=30)):
        span = text[2:2 + 10 + i % 5]
        reference = span[:4] + [(span[4] + 1) % 97] + span[5:]
        work.append((text, reference))
    return work


def add_replayed(engine, work, max_new_tokens=lambda request_id: 32) -> None:
    """Each request's reference stands in for the model's answer (ReferenceRunner), replayed to its length."""
    engine.runner = ReferenceRunner(engine.runner, {i: Reference(len(p), r) for i, (p, r) in enumerate(work)})
    for request_id, (prompt, reference) in enumerate(work):
        engine.add_request(request_id, prompt, max_new_tokens(request_id), len(reference),
                           replay_tokens=len(reference))


def run_replayed(engine, work, max_new_tokens: int = 32):
    add_replayed(engine, work, lambda _: max_new_tokens)
    results = engine.run()
    pool = engine.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks and len(pool) == 0
    return results


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
@pytest.mark.parametrize("rows_attended_limit", [16_384, 0], ids=["as-rows", "mixed-step"])
def test_drafts_save_steps_and_keep_the_tokens(model, overlap, rows_attended_limit):
    """Verified chunks run as decode rows (each token a row) or through the mixed step's varlen attention."""
    work = copy_workload()
    plain = engine_for(model, num_blocks=128, max_running=8, token_budget=64, overlap=overlap)
    plain_results = run_replayed(plain, work)
    drafting = engine_for(model, num_blocks=128, max_running=8, token_budget=64, overlap=overlap,
                          draft_tokens=4, draft_max_rows=8, rows_attended_limit=rows_attended_limit)
    results = run_replayed(drafting, work)
    for i, (_, reference) in enumerate(work):
        assert results[i].output_ids == plain_results[i].output_ids == reference
        assert results[i].finish_reason is FinishReason.STOP
    scheduler = drafting.scheduler
    assert scheduler.num_accepted_tokens > len(work)  # the copied spans were drafted and kept
    assert scheduler.num_accepted_tokens == sum(r.num_accepted_tokens for r in results.values())
    assert 0 < scheduler.num_accepted_tokens < scheduler.num_draft_tokens  # the changed token was refused
    assert drafting.stats.steps < plain.stats.steps


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_the_models_own_greedy_tokens_are_unchanged_by_drafts(model, overlap):
    """No reference: the tiny model's own greedy output, drafted from whatever it repeats."""
    workload = [(p, 24, 24) for p in prompts(6, seed=11)]
    expected = alone(model, workload)
    engine = engine_for(model, num_blocks=96, max_running=6, token_budget=48, overlap=overlap, draft_tokens=3,
                        draft_max_rows=6)
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == expected
    assert engine.scheduler.num_draft_tokens > 0


def test_drafts_stop_at_a_stop_token_and_at_the_length(model):
    work = copy_workload(num=4)
    stop = work[0][1][7]  # inside the first request's copied run: reached through kept drafts
    engine = engine_for(model, num_blocks=128, max_running=4, token_budget=64, stop_ids=[stop], draft_tokens=6)
    streamed = {}
    engine.on_tokens = lambda kept: [streamed.setdefault(key, []).extend(tokens) for key, tokens in kept.items()]
    add_replayed(engine, work, lambda request_id: 5 if request_id == 1 else 32)  # 1 ends on its length, mid-draft
    results = engine.run()
    for request_id, (_, reference) in enumerate(work):
        expected = reference[:5] if request_id == 1 else reference
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        assert results[request_id].output_ids == expected
        assert streamed[request_id] == expected  # nothing past the end is streamed
    assert results[0].finish_reason is FinishReason.STOP and len(results[0].output_ids) < len(work[0][1])
    assert results[1].finish_reason is FinishReason.LENGTH or stop in work[1][1][:5]
    pool = engine.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_drafts_beside_preemption_give_the_same_tokens(model):
    """A pool too small for every request: growth preempts (drafts never do), requests resume by
    recompute, and each still replays exactly its reference, with drafts kept along the way."""
    work = copy_workload(num=8, seed=5)
    engine = engine_for(model, num_blocks=22, block_tokens=4, max_running=8, token_budget=64, admission="greedy",
                        preempt_rule=PreemptRule.YOUNGEST, draft_tokens=4)
    results = run_replayed(engine, work)
    assert [results[i].output_ids for i in range(len(work))] == [reference for _, reference in work]
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_accepted_tokens > 0


def test_no_drafts_above_draft_max_rows(model):
    work = copy_workload(num=6)
    engine = engine_for(model, num_blocks=128, max_running=8, token_budget=64, draft_tokens=4, draft_max_rows=2)
    add_replayed(engine, work)
    drafted_with_rows = []
    while engine.has_unfinished:
        running = len(engine.scheduler.running)
        before = engine.scheduler.num_draft_tokens
        engine.step()
        if engine.scheduler.num_draft_tokens > before:
            drafted_with_rows.append(running)
    assert drafted_with_rows and max(drafted_with_rows) <= 2


def test_bad_draft_settings_are_refused():
    with pytest.raises(ValueError, match="draft"):
        SchedulerConfig(draft_tokens=-1)
    with pytest.raises(ValueError, match="draft"):
        SchedulerConfig(draft_tokens=2, draft_max_rows=0)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.triton is None, reason="needs a GPU with Triton")
@pytest.mark.parametrize("rows_attended_limit", [None, 0])  # 0: verified chunks through the mixed step
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_gpu_drafts_with_triton_kernels_and_graphs(model, rows_attended_limit, overlap):
    """On the GPU, captured steps sample several positions of a chunk: every request replays its reference
    with drafts kept, in fewer steps; and the model's own tokens come out as without drafts (but for near
    ties: TF32 products, as the engine's own GPU test allows)."""
    gpu_model = copy.deepcopy(model).cuda()
    limit = {} if rows_attended_limit is None else {"rows_attended_limit": rows_attended_limit}
    work = copy_workload()
    steps, own = {}, {}
    for draft_tokens in (0, 4):
        runner = ModelRunner.from_hf(gpu_model, num_blocks=128, block_tokens=4, use_cuda_graphs=True,
                                     max_model_tokens=128, **limit)
        config = SchedulerConfig(max_running=8, token_budget=64, draft_tokens=draft_tokens, draft_max_rows=8)
        engine = PagedEngine.build(runner, config, overlap=overlap)
        results = run_replayed(engine, work)
        assert [results[i].output_ids for i in range(len(work))] == [reference for _, reference in work]
        steps[draft_tokens] = engine.stats.steps
        engine = PagedEngine.build(runner, config, overlap=overlap)
        own_work = [(prompt, 16, 16) for prompt, _ in work]
        results = run_all(engine, own_work)
        own[draft_tokens] = [results[i].output_ids for i in range(len(work))]
    assert steps[4] < steps[0]
    assert sum(a == b for a, b in zip(own[0], own[4])) >= len(work) - 2
