"""Fixtures for predictor tests: a migrated temp SQLite log DB, a model store, small models."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.core.length_model import LengthSample
from services.core.per_app_linear import PerAppLinearModel
from services.shared.model_store import ModelStore



def linear_samples(instruction: str, intercept: float, slope: float, n: int = 20) -> list[LengthSample]:
    """Samples lying exactly on generated = intercept + slope * input_tokens."""
    return [
        LengthSample(instruction, f"input {i}", 10 + 5 * i, round(intercept + slope * (10 + 5 * i)))
        for i in range(n)
    ]


@pytest.fixture
def make_model() -> Callable[[float], PerAppLinearModel]:
    """A fitted per_app_linear model for instruction "A": generated = 5 + slope * input_tokens."""

    def make(slope: float = 2.0) -> PerAppLinearModel:
        model = PerAppLinearModel(max_tokens=4096)
        model.fit(linear_samples("A", 5.0, slope))
        return model

    return make


@pytest.fixture
def save_model(store: ModelStore) -> Callable[..., object]:
    async def save(model: PerAppLinearModel, *, is_pushed: bool = True):
        return await store.save(
            "predictor",
            model,
            model_name=model.name,
            num_train_samples=len(model.samples),
            metrics={"mae_tokens": 0.0},
            is_pushed=is_pushed,
        )

    return save


@pytest.fixture(scope="session", autouse=True)
def _warm_token_counter() -> None:
    # Loading the vocabulary once up front keeps per-test timings honest.
    from services.shared.tokenizer import get_token_counter

    get_token_counter()


FAKE_PIECE_DIMS = 32


@pytest.fixture
def fake_static_cache(tmp_path, monkeypatch):
    """A distillation cache holding random piece vectors for the bundled MiniLM's real tokenizer.

    Static models then build in milliseconds instead of running the transformer over its vocab;
    what the tests check (features, pickling, serving) does not depend on the vectors' meaning.
    """
    import numpy as np
    from tokenizers import Tokenizer

    from services.core.encoders import _cache_path, bundled_minilm_dir

    cache_dir = tmp_path / "embedding-cache"
    model_dir = bundled_minilm_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vectors = np.random.default_rng(0).normal(size=(tokenizer.get_vocab_size(), FAKE_PIECE_DIMS)).astype(np.float32)
    path = _cache_path(model_dir, cache_dir)
    path.parent.mkdir(parents=True)
    np.savez(path, tokenizer_json=np.array(tokenizer.to_str()), vectors=vectors)
    monkeypatch.setenv("MAGNUS_PREDICTOR_EMBEDDING_CACHE_DIR", str(cache_dir))
    return vectors
