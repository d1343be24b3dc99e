"""The static-KV-cache backend on the CPU (graphs off): same tokens as plain generate, stops, OOM."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.worker.engine import BatchOutOfMemory, EngineItem, StaticBatchEngine
from services.worker.preemption import Preemption
from services.worker.static_backend import STOP_CHECK_EVERY_STEPS, StaticCacheBackend, bucket_rows

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]


def tiny_mha_llama(**config) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, **config,
    )).eval()


@pytest.fixture(scope="module")
def static_engine(tiny_model_dir) -> StaticBatchEngine:
    # a small pool: 3 rows x 160 tokens of KV (the tiny Qwen2 has Delta = 512 bytes in float32)
    return StaticBatchEngine(
        tiny_model_dir, device="cpu", dtype="float32", backend="static", cpu_kv_budget_bytes=3 * 160 * 512
    )


@pytest.mark.parametrize(("attention", "batch_bucket_rows"), [("sdpa", 1), ("bmm", 1), ("sdpa", 4), ("sdpa", 8)])
def test_static_backend_matches_generate_on_mha_llama(attention, batch_bucket_rows):
    torch.manual_seed(0)
    model = tiny_mha_llama(initializer_range=0.5)
    prompt_tokens, new_tokens = 7, 24
    ids = torch.zeros((3, prompt_tokens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(PROMPTS):
        ids[i, prompt_tokens - len(row):], mask[i, prompt_tokens - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )[:, prompt_tokens:]
    backend = StaticCacheBackend(model, capacity_tokens=3 * 64, use_cuda_graphs=False, attention=attention,
                                 length_bucket_tokens=16, batch_bucket_rows=batch_bucket_rows)
    # 3 rows run as 4 (buckets of 4 and 8: powers of two below the bucket) when the pool holds 4 x 31 tokens
    assert backend.padded_rows(3, prompt_tokens + new_tokens) == (3 if batch_bucket_rows == 1 else 4)
    assert torch.equal(backend.generate(PROMPTS, 0, [new_tokens] * 3, set()), expected)
    assert set(backend._states) == {(backend.padded_rows(3, prompt_tokens + new_tokens), False)}


def test_batch_buckets_round_up_and_fall_back_to_the_exact_size_when_the_pool_is_short():
    model = tiny_mha_llama()
    backend = StaticCacheBackend(model, capacity_tokens=40 * 100, use_cuda_graphs=False, batch_bucket_rows=16)
    assert [backend.padded_rows(b, 10) for b in (1, 2, 3, 5, 9, 16, 17, 33)] == [1, 2, 4, 8, 16, 16, 32, 48]
    # above the granularity: multiples of an eighth of the next power of two (at most 25 % padding)
    assert [bucket_rows(b, 8) for b in (8, 9, 63, 65, 100, 129, 257, 500)] == [8, 16, 64, 80, 112, 160, 320, 512]
    assert len(StaticCacheBackend.bucket_sizes(SimpleNamespace(batch_bucket_rows=8), 512)) == 23
    assert backend.padded_rows(33, 100) == 33  # 48 rows x 100 tokens > 4,000: run unpadded
    assert backend.padded_rows(40, 100) == 40


def test_static_engine_matches_hf_engine_on_gqa_qwen2(engine, static_engine):
    limits = [12, 5, 9]
    expected = engine.run_ids(PROMPTS, limits, stop_at_eos=False)
    got = static_engine.run_ids(PROMPTS, limits, stop_at_eos=False)
    assert got.generated_ids == expected.generated_ids
    assert [len(row) for row in got.generated_ids] == limits


def test_theta_is_exactly_the_pool(static_engine):
    assert static_engine.backend_name == "static"
    assert static_engine.free_kv_bytes == static_engine.static.capacity_tokens * static_engine.kv_bytes_per_token
    assert static_engine.static.capacity_tokens == 3 * 160


def test_batch_stops_once_every_row_hit_a_stop_token(static_engine):
    first = static_engine.run_ids(PROMPTS, [1, 1, 1], stop_at_eos=False).generated_ids
    stops = {row[0] for row in first}
    generated = static_engine.static.generate(PROMPTS, 0, [100, 100, 100], stops)
    # every row stopped at its first token; the host notices at the next stop check
    assert generated.shape[1] == STOP_CHECK_EVERY_STEPS


def test_valid_and_total_tokens(static_engine):
    items = [EngineItem("a", "short", 3), EngineItem("b", "a somewhat longer prompt", 7)]
    output = static_engine.run(items)
    assert output.steps == 7 and output.total_tokens == 14
    assert output.valid_tokens == sum(item.generated_tokens for item in output.items)
    assert [item.generated_tokens for item in output.items] == [3, 7]


def test_batch_larger_than_the_pool_is_out_of_memory_then_engine_serves(static_engine):
    with pytest.raises(BatchOutOfMemory, match="KV slots"):
        static_engine.run_ids([[1] * 100] * 3, [100, 100, 100])  # 3 x 200 tokens > 480 slots
    assert len(static_engine.run_ids([[1, 2, 3]], [4], stop_at_eos=False).generated_ids[0]) == 4


def test_trace_replay_ignores_eos_and_stops_at_the_recorded_length(tiny_model_dir):
    engine = StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float32", trace_replay=True)
    items = [EngineItem("a", "short", 6), EngineItem("b", "a longer prompt here", 3)]
    first = engine.run_ids(engine.encode([i.prompt for i in items]), [1, 1], stop_at_eos=False).generated_ids
    engine.eos_token_ids = [first[0][0], first[1][0]]  # each row's first token now counts as EOS
    output = engine.run(items)
    assert [item.generated_tokens for item in output.items] == [6, 3]


def test_warm_up_runs_every_bucket_the_pool_holds():
    model = tiny_mha_llama()
    backend = StaticCacheBackend(model, capacity_tokens=20 * 18, use_cuda_graphs=False, batch_bucket_rows=8)
    assert backend.warm_up(24) == [1, 2, 4, 8, 16]  # 24 rows x 18 tokens > 360: stop there
    assert {rows for rows, _ in backend._states} == {1, 2, 4, 8, 16}


@pytest.mark.parametrize("which", ["hf", "static"])
def test_preemption_cuts_the_last_straggler_and_returns_its_output_so_far(which, tiny_model_dir):
    # trace replay: rows stop only at their limits, so the straggler is the row with the long limit
    target = StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float32", trace_replay=True,
                               backend=which, cpu_kv_budget_bytes=3 * 160 * 512)
    items = [EngineItem("long", "a prompt", 40), EngineItem("s1", "short one", 4), EngineItem("s2", "two", 4)]
    whole = target.run(items)
    assert not any(item.is_preempted for item in whole.items)
    cut = target.run(items, preemption=Preemption(after_steps=4, max_rows=1))
    long_whole, long_cut = whole.items[0], cut.items[0]
    assert long_cut.is_preempted and 4 <= long_cut.generated_tokens < 40
    # the static backend checks every STOP_CHECK_EVERY_STEPS steps, plain generate every step
    assert long_cut.generated_tokens == (STOP_CHECK_EVERY_STEPS if which == "static" else 4)
    assert [i.generated_tokens for i in cut.items[1:]] == [4, 4] and not any(i.is_preempted for i in cut.items[1:])
    # greedy: the cut row's tokens are the start of its uncut output
    ids_whole = target.encode([long_whole.text])[0]
    assert target.encode([long_cut.text])[0] == ids_whole[: len(target.encode([long_cut.text])[0])]
    # two rows still running is more than the cut allows: nothing is cut
    two_long = [EngineItem("a", "x", 40), EngineItem("b", "y", 40), EngineItem("c", "z", 4)]
    assert not any(i.is_preempted for i in target.run(two_long, preemption=Preemption(4, 1)).items)
