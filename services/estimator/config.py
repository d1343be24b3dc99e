"""Estimator settings, from the environment (prefix MAGNUS_ESTIMATOR_) or keyword arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.model_store import model_store_dir_field
from services.shared.settings import ServiceSettings


class EstimatorSettings(ServiceSettings):
    """Everything the estimator reads at start-up. Env names are MAGNUS_ESTIMATOR_<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="MAGNUS_ESTIMATOR_", extra="ignore", validate_by_name=True
    )

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    max_shapes: int = Field(
        4096, ge=1, le=1_000_000, description="Most shapes one EstimateBatchTime call may carry."
    )
    max_batch_size: int = Field(
        65_536, ge=1, description="Largest batch_size accepted in a shape, requests."
    )
    max_tokens: int = Field(
        1_000_000, ge=1, description="Largest input_tokens_max / gen_tokens_max accepted, tokens."
    )
    n_neighbors: int = Field(5, ge=1, le=1000, description="k of the KNN regressor, samples.")
    min_fit_samples: int = Field(
        1, ge=1, description="Calibration samples needed before the estimator fits v1 itself."
    )
    model_store_dir: Path = model_store_dir_field()
    load_retry_s: float = Field(
        5.0, gt=0, le=3600, description="While no model is loaded, seconds between load attempts."
    )
