"""Incremental detokenization with Qwen's real vocabulary (the tiny model's tokenizer)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.shared.detokenize import REPLACEMENT, IncrementalDetokenizer
from services.shared.settings import DEFAULT_MODEL_DIR
from services.shared.tokenizer import load_tokenizer

TEXTS = [
    "机器学习是人工智能的一个分支。深度学习使用神经网络。",
    "Emoji: 😀🎉👩‍👩‍👧 and flags 🇯🇵🇫🇷 mixed with text.",
    'def f(x):\n    return {"k": [x ** 2 for _ in range(3)]}  # 注释 ✓\n',
    "Ünïcödé ñ ß — “quotes” … 𝔘𝔫𝔦 and 한국어 텍스트",
]


@pytest.fixture(scope="module")
def tokenizer():
    if not DEFAULT_MODEL_DIR.is_dir():
        pytest.skip("the tiny model is not built (make model)")
    return load_tokenizer(DEFAULT_MODEL_DIR)


def _deltas(tokenizer, ids: list[int], chunk_sizes: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    deltas, start, i = [], 0, 0
    while start < len(ids):
        size = chunk_sizes[i % len(chunk_sizes)]
        deltas.append(detok.push(ids[start:start + size]))
        start, i = start + size, i + 1
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_token_at_a_time_deltas_concatenate_to_the_final_text_byte_for_byte(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = _deltas(tokenizer, ids, [1])
    assert "".join(deltas).encode() == tokenizer.decode(ids, skip_special_tokens=True).encode() == text.encode()
    assert all(REPLACEMENT not in d for d in deltas)
    assert sum(1 for d in deltas if d) >= 2


def test_the_texts_split_characters_across_tokens(tokenizer):
    """The case this exists for: a token alone is part of a character (emoji, rare CJK, math letters)."""
    split = [t for t in TEXTS if any(REPLACEMENT in tokenizer.decode([i]) for i in tokenizer(t)["input_ids"])]
    assert len(split) >= 2


def test_special_tokens_are_skipped_like_the_final_decode(tokenizer):
    ids = tokenizer("你好 world", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert "".join(_deltas(tokenizer, ids, [1])) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=40), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_any_text_in_any_chunking_concatenates_exactly(tokenizer, text, chunks):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(_deltas(tokenizer, ids, chunks)) == tokenizer.decode(ids, skip_special_tokens=True)
