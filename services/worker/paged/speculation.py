"""Speculative decoding by prompt lookup: draft tokens from the request's own text, verified in one step.

Many served tasks copy their input: a bug fix is the method with a span edited, a grammar correction
the sentence with a few words changed, a code translation keeps the identifiers. Where the text just
generated already occurred earlier in the prompt or output (its last n tokens, n = 3, 2, 1 tried in that
order), the tokens that followed it there are a cheap guess of what comes next (prompt lookup decoding,
as vLLM's "ngram" speculator). A step then computes the row's last token and k drafts together, a chunk of
k + 1 tokens whose every position is sampled; the drafts are kept while each equals the token the model
samples before it, and the first sample that differs is kept too. So a step yields 1..k + 1 tokens of
exactly the greedy output: nothing changes but how many steps it takes. Verifying costs the drafts'
compute and K/V reads; a decode step of few rows is bound by reading the weights, so at low load the
drafts ride almost free, and the scheduler drafts only then (`SchedulerConfig.draft_max_rows`).

A step that may draft is read before the next is planned (the engine's overlap is lost there), so a
request whose text offers nothing to draft should stop asking: after MISSES_BEFORE_REST attempts in a row
that kept no draft (none proposed, or none agreed with) it decodes REST_TOKENS tokens plainly before it
tries again, and while every running request rests the engine overlaps its steps as usual.

Pure: no device. `NgramIndex` is one request's lookup table, kept up to date as its tokens become known.
"""

from __future__ import annotations

from collections.abc import Sequence

# A miss costs one unoverlapped step's host time (~0.3-1 ms), a kept draft saves a whole step (~5 ms on
# an H200 at low load): so a request keeps trying through a long run of misses. In the cost model
# (bench/paged_whatif.py) resting moves the mix's 12 req/s p99 by <= 0.03 s either way and its burst by
# -2 %; it is for text with nothing to draft, where every step at low load would otherwise be serial.
MISSES_BEFORE_REST = 8  # drafting attempts in a row that kept nothing before a request rests
REST_TOKENS = 16  # output tokens a resting request then decodes without drafting


class NgramIndex:
    """Where each n-gram (n = min_ngram..max_ngram) of a token sequence last occurred with a token after it.

    `extend` appends known tokens (O(max_ngram) dict updates each); `propose(k)` looks up the sequence's
    last n tokens, longest n first, and returns up to k tokens that followed their latest earlier occurrence."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        # n-gram -> index of the token that followed its latest occurrence; an n-gram is entered only
        # once a token follows it, so the sequence's own tail never points at itself
        self._next: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: Sequence[int]) -> None:
        tokens, following = self.tokens, self._next
        for token in new_tokens:
            end = len(tokens)  # the n-grams ending just before `token` now have a follower
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                following[tuple(tokens[end - n:end])] = end
            tokens.append(token)

    def propose(self, max_tokens: int) -> tuple[int, ...]:
        """Up to max_tokens drafts (empty when no suffix of the sequence occurred before)."""
        tokens = self.tokens
        if max_tokens < 1:
            return ()
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None:
                return tuple(tokens[start:start + max_tokens])
        return ()


def accepted_tokens(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a verified chunk yields: sampled[i] is the model's token after the chunk's i-th token
    (its last known one, then the drafts), so drafts[i] stands while it equals sampled[i]; the output is
    sampled[0..a] for a the number of drafts that stood (the first differing sample is the model's own)."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"a chunk of {len(drafts)} drafts samples {len(drafts) + 1} tokens, got {len(sampled)}")
    kept = 0
    while kept < len(drafts) and drafts[kept] == sampled[kept]:
        kept += 1
    return list(sampled[:kept + 1])
