"""Incremental detokenization: text deltas from token ids as they are decoded.

Byte-level BPE (Qwen's vocabulary) splits multi-byte UTF-8 characters across tokens: a token alone
may decode to U+FFFD. So a delta is only released once the window it ends in decodes to whole
characters, and it is measured against the decoded text of the tokens before it (a prefix window),
never against a lone token: what the deltas add up to is exactly `decode(all ids)`. Each push
decodes a window of a few tokens (from the last released boundary), not the whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Deltas of one output. `push` new ids, get the text they complete; `finish` releases the rest."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this are released as text
        self.text = ""  # everything released so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still incomplete)."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT):
            return ""
        if not window_text.startswith(prefix_text):  # a decoder that rewrites context: fall back to whole text
            return self._release(self._decode(self.token_ids))
        delta = window_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text not yet released: decode(all ids) minus what was (held bytes of a last character)."""
        return self._release(self._decode(self.token_ids))

    def _release(self, full_text: str) -> str:
        self._prefix_offset = self._read_offset = len(self.token_ids)
        if not full_text.startswith(self.text):
            return ""  # cannot take back what was sent; the final answer carries the exact text
        delta = full_text[len(self.text):]
        self.text = full_text
        return delta
