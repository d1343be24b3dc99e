"""Trainer settings, from the environment (prefix MAGNUS_TRAINER_) or keyword arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.shared.db.models import ModelKind
from services.shared.model_store import model_store_dir_field
from services.shared.settings import ServiceSettings


def parse_targets(value: str) -> list[str]:
    """'host:port, host:port' -> ['host:port', ...]; raises ValueError on a malformed entry."""
    targets = [item.strip() for item in value.split(",") if item.strip()]
    for target in targets:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"target {target!r} is not host:port")
    return targets


class TrainerSettings(ServiceSettings):
    """Everything the trainer reads at start-up. Env names are MAGNUS_TRAINER_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_TRAINER_", extra="ignore", validate_by_name=True)

    port: int = Field(50054, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    predictor_period_s: float = Field(180.0, ge=0.1, description="Seconds between predictor rounds.")
    estimator_period_s: float = Field(120.0, ge=0.1, description="Seconds between estimator rounds.")
    is_schedule_enabled: bool = Field(
        True, description="Run rounds on the periods above; off = only on Retrain calls."
    )
    predictor_targets: str = Field(
        "", description="Predictor replicas to push new versions to: comma-separated host:port list."
    )
    estimator_targets: str = Field(
        "", description="Estimator replicas to push new versions to: comma-separated host:port list."
    )
    length_miss_abs_tokens: float = Field(
        10.0, ge=0, description="A request's miss is bad above this many tokens (and the rel share)."
    )
    length_miss_rel: float = Field(
        0.10, ge=0, description="... and above this share of the true generation length (0.10 = 10 %)."
    )
    length_min_samples_per_instruction: int = Field(
        500, ge=0, description="While the predictor's training set holds fewer samples than this of an "
        "instruction, every completed request of it is added, not only its bad misses (a new task is learned "
        "from its whole length distribution, not its tail; services/trainer/selection.py); 0 = only bad misses "
        "(the paper), samples.",
    )
    time_miss_abs_s: float = Field(2.0, ge=0, description="A batch's miss is bad above this many seconds ...")
    time_miss_rel: float = Field(0.20, ge=0, description="... and above this share of its true time.")
    holdout_every: int = Field(
        5, ge=0, description="Every n-th logged row (by seq) is held back for validation; 0 = none."
    )
    validation_window_rows: int = Field(
        5000, ge=1, description="Held-back rows are taken from this many most recent log rows, rows."
    )
    max_rows_per_round: int = Field(
        100_000, ge=1, description="Most new log rows one round reads; the rest wait for the next, rows."
    )
    max_train_samples: int = Field(
        200_000, ge=1, description="Training-set cap; the oldest samples are dropped first, samples."
    )
    time_supersede_log_radius: float = Field(
        0.2,
        ge=0,
        description="A new estimator sample replaces old ones whose batch size, L and G are all within this "
        "distance in log1p space (~ +-20 %): the device's speed there changed. 0 = only add (the paper).",
    )
    push_tolerance_rel: float = Field(
        0.0, ge=0, description="Push if candidate MAE <= serving MAE * (1 + this) on held-back rows."
    )
    push_noise_z: float = Field(
        1.645, ge=0, description="... or worse by no more than this many standard errors of the per-row error "
        "differences on those rows (a candidate really no worse is blocked in at most ~5 % of rounds); 0 = the "
        "plain comparison of the two MAEs.",
    )
    push_timeout_s: float = Field(30.0, gt=0, description="Deadline of one LoadModel push, seconds.")
    model_store_dir: Path = model_store_dir_field()

    @field_validator("predictor_targets", "estimator_targets")
    @classmethod
    def _check_targets(cls, value: str) -> str:
        parse_targets(value)
        return value

    def targets(self, kind: str) -> list[str]:
        return parse_targets(self.predictor_targets if kind == ModelKind.PREDICTOR else self.estimator_targets)
