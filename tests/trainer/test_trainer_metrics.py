"""The trainer's metrics move with its rounds: outcome, samples, push decision, candidate error."""

from __future__ import annotations

import math

import pytest
from prometheus_client import REGISTRY

from services.trainer.rounds import Trainer
from tests.trainer.test_trainer_rounds import drifted_rows, line, save_base_predictor, trainer_settings

pytestmark = pytest.mark.asyncio


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_rounds_samples_versions_and_candidate_error_are_exported(db_url, store_dir, store, add_requests):
    await save_base_predictor(store)
    trainer = Trainer(trainer_settings(db_url, store_dir), store)
    before = {
        outcome: sample("magnus_trainer_rounds_total", kind="predictor", outcome=outcome)
        for outcome in ("trained", "no_new_rows", "no_bad_misses")
    }
    samples_before = sample("magnus_trainer_samples_added_total", kind="predictor")
    pushed_before = sample("magnus_trainer_versions_total", kind="predictor", decision="pushed")
    held_before = sample("magnus_trainer_versions_total", kind="predictor", decision="held_back")

    await add_requests(drifted_rows(50))  # 40 bad misses to train on, 10 held back
    trained = await trainer.run_round("predictor")
    assert trained.is_pushed
    await trainer.run_round("predictor")  # nothing new
    await add_requests([(x, line(x, 2.0) + 1, line(x, 2.0)) for x in range(20, 60, 4)])  # small misses only
    await trainer.run_round("predictor")

    for outcome in ("trained", "no_new_rows", "no_bad_misses"):
        assert sample("magnus_trainer_rounds_total", kind="predictor", outcome=outcome) == before[outcome] + 1
    assert sample("magnus_trainer_samples_added_total", kind="predictor") == samples_before + 40
    assert sample("magnus_trainer_versions_total", kind="predictor", decision="pushed") == pushed_before + 1
    assert sample("magnus_trainer_versions_total", kind="predictor", decision="held_back") == held_before
    error = sample("magnus_trainer_candidate_validation_error", kind="predictor", metric="mae_tokens")
    stored = (await store.find("predictor", trained.new_version)).metrics["mae_tokens"]
    assert math.isclose(error, stored) and error == trained.candidate_error
    duration_s = sample("magnus_trainer_last_round_duration_seconds", kind="predictor")
    assert 0 < duration_s < 60
