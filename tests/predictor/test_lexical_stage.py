"""The per-instruction lexical stage on the forest: exact leave-one-out, kept only where it helps,
and the served model family with it (static encoders use the `fake_static_cache` fixture)."""

from __future__ import annotations

import pickle

import numpy as np
from sklearn.linear_model import Ridge

from services.core import lexical_stage
from services.core.embedding_forest import SERVED_MODEL, EmbeddingForestModel, ForestConfig
from services.core.length_model import LengthSample, make_length_model
from services.core.lexical_stage import apply_corrections, fit_correction, fit_corrections, lexical_features

WORDS = ("the", "a", "name", "city", "of", "river", "x")
COST_TOKENS = {"the": 0, "a": 0, "name": 4, "city": 2, "of": 0, "river": 3, "x": 1}


def sentences(num_rows: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 15))) for _ in range(num_rows)]


def word_cost(text: str) -> int:
    return sum(COST_TOKENS[w] for w in text.split())


def dense_used_columns(x, *others):
    """The columns some row of `x` uses, dense (exact solvers need dense input; hashing spaces are huge)."""
    used = np.flatnonzero(x.getnnz(axis=0))
    return [m[:, used].toarray() for m in (x, *others)]


def test_leave_one_out_is_refitting_without_the_row() -> None:
    texts = sentences(40, seed=0)
    tokens = [len(t.split()) for t in texts]
    target = np.array([word_cost(t) for t in texts], dtype=np.float64) + np.random.default_rng(1).normal(size=40)
    x = lexical_features("words", texts, tokens)
    gram = lexical_stage._centred_gram(x)
    values, vectors = np.linalg.eigh(gram)
    loo = lexical_stage._loo_ridge(gram, target, 10.0, (np.maximum(values, 0.0), vectors))
    (x,) = dense_used_columns(x)
    for i in range(0, 40, 7):
        keep = np.arange(40) != i
        refit = Ridge(alpha=10.0, solver="cholesky").fit(x[keep], target[keep])
        assert abs(refit.predict(x[i : i + 1])[0] - loo[i]) < 1e-6


def test_a_word_cost_is_learned_and_the_fitted_stage_is_ridge() -> None:
    texts = sentences(150, seed=2)
    tokens = [len(t.split()) for t in texts]
    error = np.array([word_cost(t) for t in texts], dtype=np.float64)
    correction, loo = fit_correction(texts, tokens, error)
    assert correction is not None
    assert correction.loo_mae_tokens < 0.5 * correction.forest_mae_tokens
    assert np.abs(error - loo).mean() == correction.loo_mae_tokens
    queries = sentences(10, seed=3)
    x, query_x = dense_used_columns(lexical_features(correction.kind, texts, tokens),
                                    lexical_features(correction.kind, queries, [len(q.split()) for q in queries]))
    ridge = Ridge(alpha=correction.alpha, solver="cholesky").fit(x, error)
    assert np.allclose(correction.predict(queries, [len(q.split()) for q in queries]), ridge.predict(query_x), atol=1e-6)


def test_a_stage_is_kept_only_where_it_beats_the_forest_and_has_rows() -> None:
    rng = np.random.default_rng(4)
    learnable, noise, few = sentences(150, 5), sentences(150, 6), sentences(lexical_stage.MIN_ROWS - 1, 7)
    texts = learnable + noise + few
    instructions = ["learnable"] * 150 + ["noise"] * 150 + ["few"] * len(few)
    error = np.concatenate([
        [word_cost(t) for t in learnable],
        rng.laplace(scale=3.0, size=150),  # nothing in the words predicts it
        [word_cost(t) for t in few],
    ])
    tokens = [len(t.split()) for t in texts]
    corrections, per_row = fit_corrections(instructions, texts, tokens, error)
    assert set(corrections) == {"learnable"}
    assert (per_row[150:] == 0).all() and np.abs(per_row[:150]).sum() > 0
    point = np.full(3, 10.0)
    moved = apply_corrections(corrections, point, ["learnable", "noise", "unseen"], ["name name"] * 3, [2, 2, 2])
    assert moved[0] > 15 and moved[1:].tolist() == [10.0, 10.0]


def word_cost_samples(instruction: str, texts: list[str]) -> list[LengthSample]:
    # the length is the words' cost, which the token count (number of words) does not determine
    return [LengthSample(instruction, t, len(t.split()) + 3, word_cost(t) + 1) for t in texts]


def test_served_family_learns_word_costs_and_keeps_quantiles(fake_static_cache) -> None:
    train = word_cost_samples("Translate", sentences(400, 8)) + word_cost_samples("Other", sentences(60, 9))
    test = word_cost_samples("Translate", sentences(100, 10))
    with_stage = make_length_model(SERVED_MODEL, num_trees=20)
    assert with_stage.config.use_lexical_stage
    with_stage.fit(train)
    without = EmbeddingForestModel("plain", with_stage.config, num_trees=20, use_lexical_stage=False)
    without.fit(train)
    assert set(with_stage.corrections) == {"Translate"} and without.corrections == {}
    query = ([s.instruction for s in test], [s.input_text for s in test], [s.input_tokens for s in test])
    truth = np.array([s.generated_tokens for s in test])
    mae_with = np.abs(with_stage.predict(*query) - truth).mean()
    mae_without = np.abs(without.predict(*query) - truth).mean()
    assert mae_with < 0.7 * mae_without
    point, upper, calibrated = with_stage.predict_quantiles(*query, levels=(0.5, 0.9))
    assert np.array_equal(point, with_stage.predict(*query)) and (upper >= point).all()
    assert calibrated is not None and (calibrated.quantiles[:, 1] >= point).all()
    assert 0.8 <= (truth <= calibrated.quantiles[:, 1]).mean() <= 1.0
    # an instruction without a stage is answered by the forest alone, the same forest
    unseen = (["never seen", "Other"], ["name city", "river x"], [5, 5])
    assert np.array_equal(with_stage.predict(*unseen), without.predict(*unseen))
    restored = pickle.loads(pickle.dumps(with_stage))
    assert np.array_equal(restored.predict(*query), with_stage.predict(*query))


def test_an_artifact_pickled_before_the_stage_still_predicts(fake_static_cache) -> None:
    model = make_length_model("magnus_static", num_trees=10)
    model.fit(word_cost_samples("Translate", sentences(120, 11)))
    expected = model.predict(["Translate"], ["name city"], [5])
    # as stored before this stage: no `corrections`, and the config's state one field shorter
    del model.__dict__["corrections"]
    old_config = object.__new__(ForestConfig)
    old_config.__setstate__(model.config.__getstate__()[:-1])
    model.config = old_config
    restored = pickle.loads(pickle.dumps(model))
    assert restored.config.max_tokens == ForestConfig().max_tokens and restored.config.seed == 0
    assert np.array_equal(restored.predict(["Translate"], ["name city"], [5]), expected)
