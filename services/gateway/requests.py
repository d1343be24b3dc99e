"""OpenAI request bodies -> what the batcher runs. Pure: no I/O.

Validation errors name the OpenAI field (`param`), so a 400 says which one is wrong. Sampling
parameters (temperature, top_p, seed, ...) are accepted and ignored: Magnus decodes greedily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.gateway.chat import ChatRenderer


class BadRequest(Exception):
    """A 400: `param` names the request field."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    user: str = ""
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty strings")
        return value


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("exactly one prompt per request (send a string)")
            return value[0]
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        """String content, or the text parts of a list of content parts."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Job:
    """One request as the batcher takes it, and how the answer is shaped."""

    is_chat: bool
    prompt: str
    max_tokens: int
    stops: tuple[str, ...]
    is_stream: bool
    tenant_id: str
    model: str


def parse(body: Any, *, is_chat: bool, renderer: ChatRenderer, default_max_tokens: int, model: str) -> Job:
    """Validate a decoded JSON body; raise BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    try:
        parsed = (ChatBody if is_chat else CompletionBody).model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise BadRequest(param, f"{param}: {first['msg']}") from None
    if is_chat:
        prompt = renderer.render([(m.role, m.text()) for m in parsed.messages])
        max_tokens = parsed.max_completion_tokens or parsed.max_tokens or default_max_tokens
    else:
        if parsed.echo:
            raise BadRequest("echo", "echo: not supported")
        prompt, max_tokens = parsed.prompt, parsed.max_tokens or default_max_tokens
    if not prompt.strip():
        field = "messages" if is_chat else "prompt"
        raise BadRequest(field, f"{field}: must not be empty")
    stops = (parsed.stop,) if isinstance(parsed.stop, str) else tuple(parsed.stop or ())
    return Job(is_chat, prompt, max_tokens, stops, parsed.stream, parsed.user, parsed.model or model)


# The batcher names its fields (INVALID_ARGUMENT "prompt.max_new_tokens: ..."): the OpenAI field they came from.
def openai_param(batcher_field: str, is_chat: bool) -> str | None:
    return {
        "prompt.max_new_tokens": "max_tokens",
        "prompt.user_input": "messages" if is_chat else "prompt",
        "prompt.instruction": "messages" if is_chat else "prompt",
        "prompt.tenant_id": "user",
    }.get(batcher_field)
