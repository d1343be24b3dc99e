"""Settings base shared by every service: env-driven, validated at start-up.

Each service subclasses `ServiceSettings` with its own prefix (`MAGNUS_BATCHER_`, ...). The log
database URL is shared by all services and read from `MAGNUS_DATABASE_URL` without a prefix.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
VAR_DIR = REPO_ROOT / "var"


from services.shared.db.engine import default_database_url  # noqa: E402 - one definition of the default


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set `model_config` with their env prefix."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_", extra="ignore", validate_by_name=True)

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    metrics_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="Port of the Prometheus /metrics HTTP endpoint (same host as gRPC); -1 = off, 0 = any free one.",
    )
    database_url: str = Field(
        default_factory=default_database_url,
        validation_alias=AliasChoices("MAGNUS_DATABASE_URL", "database_url"),
        description="SQLAlchemy async URL of the log DB (sqlite+aiosqlite:// or postgresql+asyncpg://).",
    )
    log_level: str = Field("INFO", description="Python logging level name.")
    shutdown_grace_s: float = Field(
        10.0, gt=0, description="On SIGTERM, how long in-flight RPCs may take to finish, seconds."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, bytes."
    )
    max_unanswered_rpcs: int = Field(
        50_000, ge=1, description="Calls the gRPC core holds before the service's code has taken them up; past it "
        "gRPC cancels new calls (CANCELLED). gRPC's own default, 1,000 (dropping at random up to 3,000), cancelled "
        "part of any larger burst before admission could answer it (RESOURCE_EXHAUSTED when a queue is full).",
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


DEFAULT_MODEL_DIR = VAR_DIR / "models" / "tiny-qwen2"


def serving_model_setting() -> str:
    """MAGNUS_MODEL: a local HF model folder, or "" for the built-in tiny random Qwen2 model.

    Shared by the worker (which serves it) and the batcher/predictor (which count tokens with its
    tokenizer), so every component measures lengths in the same tokens.
    """
    import os

    return os.environ.get("MAGNUS_MODEL", "")
