"""Gateway settings: env prefix MAGNUS_GATEWAY_, validated at start-up."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings, serving_model_setting


class GatewaySettings(ServiceSettings):
    """The HTTP gateway. `metrics_port` is not used: /metrics is served on the HTTP port itself."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_GATEWAY_", extra="ignore", validate_by_name=True)

    port: int = Field(8080, ge=0, le=65535, description="HTTP port of the OpenAI-compatible API; 0 picks a free one.")
    batcher_target: str = Field(
        "127.0.0.1:50051",
        description="The batcher's client address (GenerationService). TLS as MAGNUS_TLS_* says; the caller's "
        "Authorization header is forwarded, never the service token.",
    )
    model_name: str = Field(
        "",
        description="Model id in /v1/models and in responses; empty = the folder name of MAGNUS_MODEL, or "
        "'magnus-tiny-qwen2' for the built-in model. Requests may name any model: one model is served.",
    )
    chat_template_model: str = Field(
        default_factory=serving_model_setting,
        description="HF model folder whose tokenizer's chat template renders chat messages (default MAGNUS_MODEL). "
        "Without one (the built-in model has none), messages are rendered as ChatML, Qwen's chat format.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="gRPC deadline of each call to the batcher, seconds; past it the answer is 504."
    )
    default_max_tokens: int = Field(16, ge=1, description="/v1/completions without max_tokens (OpenAI's default).")
    default_chat_max_tokens: int = Field(
        256, ge=1, description="/v1/chat/completions without max_tokens or max_completion_tokens."
    )
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body accepted, bytes (413 above; the batcher bounds "
        "prompts further)."
    )
    health_timeout_s: float = Field(1.0, gt=0, description="Deadline of the batcher health check behind /health.")

    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        return self.chat_template_model.rstrip("/").rsplit("/", 1)[-1] if self.chat_template_model else (
            "magnus-tiny-qwen2")
