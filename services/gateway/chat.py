"""Chat messages -> one prompt: the model's chat template, else ChatML (Qwen's chat format)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


def chatml(messages: Sequence[tuple[str, str]]) -> str:
    """The fallback: ChatML, which Qwen models (and the built-in tiny one's vocabulary) are trained on."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


class ChatRenderer:
    """Renders with `tokenizer.apply_chat_template` when the model folder's tokenizer has a template."""

    def __init__(self, model_dir: str = "") -> None:
        self._tokenizer = None
        if model_dir:
            from services.shared.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model_dir)
            if getattr(tokenizer, "chat_template", None):
                self._tokenizer = tokenizer
            else:
                log.info("%s has no chat template: chat messages are rendered as ChatML", model_dir)

    @property
    def name(self) -> str:
        return "model chat template" if self._tokenizer is not None else "ChatML fallback"

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        if self._tokenizer is None:
            return chatml(messages)
        return self._tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            tokenize=False, add_generation_prompt=True,
        )
