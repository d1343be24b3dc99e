"""Predictor settings, from the environment (prefix MAGNUS_PREDICTOR_) or keyword arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.core.encoders import EmbeddingSettings
from services.shared.model_store import model_store_dir_field
from services.shared.settings import ServiceSettings


class PredictorSettings(ServiceSettings, EmbeddingSettings):
    """Everything the predictor reads at start-up. Env names are MAGNUS_PREDICTOR_<FIELD>.

    `embedding_model` and `embedding_cache_dir` come from `EmbeddingSettings` (the trainer reads them too).
    """

    model_config = SettingsConfigDict(
        env_prefix="MAGNUS_PREDICTOR_", extra="ignore", validate_by_name=True
    )

    port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    max_batch: int = Field(
        1024, ge=1, le=100_000, description="Most queries one PredictLengths call may carry, queries."
    )
    max_instruction_bytes: int = Field(
        4096, ge=1, description="Longest instruction accepted, UTF-8 bytes."
    )
    max_user_input_bytes: int = Field(
        256 * 1024, ge=1, description="Longest user input accepted, UTF-8 bytes."
    )
    max_input_tokens: int = Field(
        1_000_000, ge=1, description="Largest input_tokens a caller may pass, tokens."
    )
    upper_quantile: float = Field(
        0.9, ge=0.5, le=1.0, description="Quantile of a forest's trees reported as predicted_tokens_upper "
        "(the batcher's magnus_pack plans with it); models without a spread report their point prediction."
    )
    quantile_levels: tuple[float, ...] = Field(
        (0.5, 0.9, 0.95),
        description="Levels of the calibrated quantiles PredictLengths returns (strictly increasing, each "
        "in (0, 1); env as a JSON list, e.g. [0.9]). Models without a calibration return none.",
    )
    model_store_dir: Path = model_store_dir_field()
    load_retry_s: float = Field(
        5.0, gt=0, le=3600, description="While no model is loaded, seconds between load attempts."
    )

    @field_validator("quantile_levels")
    @classmethod
    def _check_levels(cls, levels: tuple[float, ...]) -> tuple[float, ...]:
        if not levels:
            raise ValueError("quantile_levels needs at least one level")
        if any(not 0.0 < q < 1.0 for q in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"quantile_levels must be strictly increasing levels in (0, 1), got {list(levels)}")
        return levels
