"""The paged continuous engine on a tiny Llama / Qwen2 (float32, CPU): every request gets exactly the
greedy tokens it gets alone (and that transformers' forward gives), in a continuous batch, with its
prompt chunked over several steps, and after being preempted and resumed by recompute."""

from __future__ import annotations

import copy

import pytest
import torch

from services.worker.paged import attention

from services.worker.paged.engine import PagedEngine
from services.worker.paged.runner import ModelRunner
from services.worker.paged.scheduler import Admission, FinishReason, PreemptRule, SchedulerConfig
from tests.worker.test_paged_decode_step import TINY, tiny_model

VOCAB = TINY["vocab_size"]


def prompts(num: int, seed: int = 0, low: int = 3, high: int = 23) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (num,), generator=gen).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def engine_for(model, num_blocks: int, block_tokens: int = 4, stop_ids=(), rows_attended_limit: int = 16_384,
               overlap: bool = False, **config) -> PagedEngine:
    runner = ModelRunner.from_hf(model, num_blocks=num_blocks, block_tokens=block_tokens,
                                 rows_attended_limit=rows_attended_limit)
    return PagedEngine.build(runner, SchedulerConfig(**config), stop_ids, overlap=overlap)


def run_all(engine: PagedEngine, requests) -> dict:
    for request_id, (prompt, max_new, predicted) in enumerate(requests):
        engine.add_request(request_id, prompt, max_new, predicted)
    results = engine.run()
    pool = engine.scheduler.pool
    assert pool.num_free_blocks == pool.num_blocks and len(pool) == 0  # every block came back
    return results


def alone(model, requests, **config) -> list[list[int]]:
    tokens = []
    for prompt, max_new, predicted in requests:
        engine = engine_for(model, num_blocks=64, **config)
        tokens.append(run_all(engine, [(prompt, max_new, predicted)])[0].output_ids)
    return tokens


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def workload():
    """Ten requests: random prompts of 3-22 tokens, 4-19 new tokens, predictions off by up to 50 %."""
    gen = torch.Generator().manual_seed(7)
    max_new = torch.randint(4, 20, (10,), generator=gen).tolist()
    return [(p, n, max(1, int(n * (0.5 + torch.rand(1, generator=gen).item())))) for p, n in zip(prompts(10), max_new)]


@pytest.fixture(scope="module")
def alone_tokens(model, workload):
    return alone(model, workload)


def test_alone_equals_transformers(model, workload, alone_tokens):
    for (prompt, max_new, _), tokens in list(zip(workload, alone_tokens))[:3]:
        assert tokens == hf_greedy(model, prompt, max_new)


# steps with prefill chunks: as decode rows (the default, these prompts are short) or the mixed step
# (limit 0); `alone_tokens` ran with the default, so the mixed step is checked against the rows path
STEP_PATHS = pytest.mark.parametrize("rows_attended_limit", [16_384, 0], ids=["prefill-as-rows", "mixed-step"])


@STEP_PATHS
def test_continuous_batch_equals_alone(model, workload, alone_tokens, rows_attended_limit):
    engine = engine_for(model, num_blocks=64, max_running=4, token_budget=64, rows_attended_limit=rows_attended_limit)
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == alone_tokens
    assert all(r.finish_reason is FinishReason.LENGTH and r.num_preemptions == 0 for r in results.values())
    assert engine.scheduler.max_running_seen == 4
    assert engine.stats.decode_only_steps > 0 and engine.stats.decode_only_steps < engine.stats.steps


@STEP_PATHS
def test_chunked_prefill_equals_whole_prefill(model, workload, alone_tokens, rows_attended_limit):
    # a budget of 5 tokens for 2 rows: every prompt of > 4 tokens is prefilled over several steps,
    # next to the other row's decode
    engine = engine_for(model, num_blocks=64, max_running=2, token_budget=5, rows_attended_limit=rows_attended_limit)
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == alone_tokens
    assert engine.stats.batched_tokens <= 5 * engine.stats.steps


@pytest.mark.parametrize("rule", list(PreemptRule))
@pytest.mark.parametrize("admission", list(Admission))
def test_pool_too_small_preempts_and_resumes_with_the_same_tokens(model, workload, alone_tokens, rule, admission):
    # 12 blocks of 4 tokens = 48 tokens; the longest request needs 41: most of the time one or two fit
    engine = engine_for(model, num_blocks=12, max_running=6, token_budget=32, admission=admission,
                        preempt_rule=rule, margin=0.5)
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == alone_tokens  # nothing failed, nothing lost
    assert engine.scheduler.num_preemptions > 0
    assert sum(r.num_preemptions for r in results.values()) == engine.scheduler.num_preemptions
    assert sum(r.num_recomputed_tokens for r in results.values()) == engine.scheduler.num_recomputed_tokens > 0


def test_stop_token_ends_a_request_and_is_kept(model, workload, alone_tokens):
    prompt, max_new, predicted = workload[0]
    stop = alone_tokens[0][2]
    expected = alone_tokens[0][: alone_tokens[0].index(stop) + 1]
    engine = engine_for(model, num_blocks=16, stop_ids=[stop])
    result = run_all(engine, [(prompt, max_new, predicted)])[0]
    assert result.output_ids == expected and result.finish_reason is FinishReason.STOP
    assert result.total_s >= result.first_token_s >= result.queued_s >= 0


# overlap: step N+1 planned and launched before step N's tokens are read (PagedEngine's overlap)
OVERLAP_CASES = {
    "batch": dict(num_blocks=64, max_running=4, token_budget=64),
    "chunked-prefill": dict(num_blocks=64, max_running=2, token_budget=5),
    "mixed-step": dict(num_blocks=64, max_running=4, token_budget=64, rows_attended_limit=0),
    "preempting": dict(num_blocks=12, max_running=6, token_budget=32, margin=0.5),
    "preempting-greedy": dict(num_blocks=12, max_running=6, token_budget=32, admission=Admission.GREEDY,
                              preempt_rule=PreemptRule.YOUNGEST),
    "static-batches": dict(num_blocks=64, max_running=3, token_budget=16, static_batches=True),
}


@pytest.mark.parametrize("case", OVERLAP_CASES)
def test_overlapped_steps_give_the_same_tokens(model, workload, alone_tokens, case):
    engine = engine_for(model, overlap=True, **OVERLAP_CASES[case])
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == alone_tokens
    if case.startswith("preempting"):
        assert engine.scheduler.num_preemptions > 0
        assert sum(r.num_preemptions for r in results.values()) == engine.scheduler.num_preemptions


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_stop_tokens_end_requests_and_only_their_tokens_stream(model, workload, alone_tokens, overlap):
    """A stop token common to several requests: each ends on its first one (kept), in a batch where
    others run on; overlapped, the token a stopped request computed one step too far is dropped,
    never streamed."""
    counts = {}
    for tokens in alone_tokens:
        for token in set(tokens[1:-1]):
            counts[token] = counts.get(token, 0) + 1
    stop = max(counts, key=counts.get)
    expected = [tokens[: tokens.index(stop) + 1] if stop in tokens else tokens for tokens in alone_tokens]
    assert sum(len(e) < len(t) for e, t in zip(expected, alone_tokens)) >= 2  # the case is exercised
    engine = engine_for(model, num_blocks=64, max_running=4, token_budget=64, stop_ids=[stop], overlap=overlap)
    streamed: dict[int, list[int]] = {}
    engine.on_tokens = lambda kept: [streamed.setdefault(key, []).extend(tokens) for key, tokens in kept.items()]
    results = run_all(engine, workload)
    assert [results[i].output_ids for i in range(len(workload))] == expected
    assert [streamed[i] for i in range(len(workload))] == expected
    for i, (got, full) in enumerate(zip(expected, alone_tokens)):
        assert results[i].finish_reason is (FinishReason.STOP if len(got) < len(full) else FinishReason.LENGTH)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_abort_frees_the_blocks(model, workload, overlap):
    engine = engine_for(model, num_blocks=32, max_running=4, overlap=overlap)
    for request_id, (prompt, max_new, predicted) in enumerate(workload[:4]):
        engine.add_request(request_id, prompt, max_new, predicted)
    engine.step()
    assert engine.abort(1).finish_reason is FinishReason.ABORT
    assert engine.abort(1) is None
    results = engine.run()
    assert sorted(results) == [0, 2, 3]
    assert engine.scheduler.pool.num_free_blocks == 32


def test_a_request_longer_than_the_pool_is_refused(model):
    engine = engine_for(model, num_blocks=4)  # 16 tokens
    with pytest.raises(ValueError, match="exceed the KV pool"):
        engine.add_request("long", [1] * 10, 7)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.triton is None, reason="needs a GPU with Triton")
@pytest.mark.parametrize("rows_attended_limit", [None, 0])  # 0: every step with a prefill is a mixed step
@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlapped"])
def test_gpu_engine_with_triton_kernels_and_graphs_gives_the_cpu_tokens(model, workload, alone_tokens,
                                                                        rows_attended_limit, overlap):
    gpu_model = copy.deepcopy(model).cuda()
    tokens = {}
    limit = {} if rows_attended_limit is None else {"rows_attended_limit": rows_attended_limit}
    for use_graphs in (False, True):
        runner = ModelRunner.from_hf(gpu_model, num_blocks=64, block_tokens=4, use_cuda_graphs=use_graphs,
                                     max_model_tokens=128, **limit)
        engine = PagedEngine.build(runner, SchedulerConfig(max_running=4, token_budget=16), overlap=overlap)
        results = run_all(engine, workload)
        tokens[use_graphs] = [results[i].output_ids for i in range(len(workload))]
        if use_graphs:
            assert runner.num_graph_captures > 0
            assert runner.num_mixed_graph_captures > 0 or rows_attended_limit is None
    # float32 on both, but TF32 tensor-core products and split softmax on the GPU: a near tie may flip
    matches = {flag: sum(a == b for a, b in zip(got, alone_tokens)) for flag, got in tokens.items()}
    print(f"GPU paged engine{' (overlapped steps)' if overlap else ''}: sequences equal to the CPU's, "
          f"eager {matches[False]}/10, graphs {matches[True]}/10")
    assert min(matches.values()) >= 8
