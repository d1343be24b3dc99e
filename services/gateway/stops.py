"""Stop sequences over streamed text. Pure: the batcher knows none, so the gateway cuts the text and
cancels the request once one appears."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed deltas in order; get back the text safe to send. Text that may be the start of a stop
    sequence is held until the next delta settles it; at a stop, the text before it is released
    and `is_stopped` turns true (the stop sequence itself is never sent, as in OpenAI's API)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._hold_chars = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.is_stopped = False

    def feed(self, delta: str) -> str:
        if self.is_stopped:
            return ""
        if not self._stops:
            return delta
        text = self._pending + delta
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if found:
            self.is_stopped = True
            self._pending = ""
            return text[:min(found)]
        keep = min(self._hold_chars, len(text))
        # hold only a tail that could still grow into a stop sequence
        while keep and not any(s.startswith(text[len(text) - keep:]) for s in self._stops):
            keep -= 1
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep] if keep else text

    def finish(self) -> str:
        """End of output: the held text was no stop sequence after all."""
        held, self._pending = ("" if self.is_stopped else self._pending), ""
        return held
