"""Trainer settings validation."""

from __future__ import annotations

import pytest

from services.trainer.config import TrainerSettings


def test_settings_reject_malformed_targets() -> None:
    with pytest.raises(ValueError, match="not host:port"):
        TrainerSettings(predictor_targets="localhost:50052,nonsense")
    assert TrainerSettings(estimator_targets=" a:1 , b:2 ").targets("estimator") == ["a:1", "b:2"]
