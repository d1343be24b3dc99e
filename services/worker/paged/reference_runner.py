"""Benchmarks on random weights: a runner whose sampled tokens are each request's reference output.

Random weights agree with no draft (speculation.py), so measuring drafts needs a model whose greedy answers
are known. `ReferenceRunner` wraps a ModelRunner's public verbs (prepare, step, launch, collect) and puts,
in place of every token the step samples for a request with a reference, the reference's token at that
output position: drafts are then verified against real text while every step computes exactly what it
would. The scheduler and engine are untouched; nothing in serving uses this (bench/gpu_serving.py's
`magnus_ccb_spec`, bench/paged_host_time.py, the drafting tests do). Under overlapped steps a decode row
still feeds the device's own token (the model's argmax) to the next step: with random weights the step's
time does not depend on which token it is.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from services.worker.paged.request import StepPlan


@dataclass(frozen=True)
class Reference:
    prompt_tokens: int
    output_ids: Sequence[int]  # the answer the stand-in model gives, token by token


def first_output_positions(plan: StepPlan, references: Mapping[Hashable, Reference]) -> dict[Hashable, int]:
    """Per sampled chunk of a request with a reference: the output index of its first sampled token (a
    chunk samples after its last token, and after each draft before it)."""
    return {c.request_id: c.context_tokens - c.num_drafts - references[c.request_id].prompt_tokens
            for c in plan.chunks if c.is_sampled and c.request_id in references}


def forced(sampled: Mapping[Hashable, int | tuple[int, ...]], positions: Mapping[Hashable, int],
           references: Mapping[Hashable, Reference]) -> dict[Hashable, int | tuple[int, ...]]:
    """`sampled` (one token, or a tuple for a chunk with drafts) with each token replaced by the
    reference's at its output position, where the reference reaches that far."""
    result = dict(sampled)
    for request_id, first in positions.items():
        tokens, reference = sampled[request_id], references[request_id].output_ids
        many = tokens if isinstance(tokens, tuple) else (tokens,)
        kept = tuple(reference[first + i] if first + i < len(reference) else token for i, token in enumerate(many))
        result[request_id] = kept if isinstance(tokens, tuple) else kept[0]
    return result


class ReferenceRunner:
    """A ModelRunner (any attribute not defined here is the wrapped runner's) whose sampled tokens are
    the references' (see the module docstring). references: request id -> Reference."""

    def __init__(self, runner, references: Mapping[Hashable, Reference]) -> None:
        self.runner = runner
        self.references = references
        self._positions: dict[int, tuple[object, dict[Hashable, int]]] = {}  # id(step object) -> (it, positions)

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def prepare(self, plan: StepPlan, previous=None):
        prepared = self.runner.prepare(plan, previous=previous)
        self._positions[id(prepared)] = (prepared, first_output_positions(plan, self.references))
        return prepared

    def step(self, prepared):
        return forced(self.runner.step(prepared), self._positions.pop(id(prepared))[1], self.references)

    def launch(self, prepared):
        launched = self.runner.launch(prepared)
        self._positions[id(launched)] = (launched, self._positions.pop(id(prepared))[1])
        return launched

    def collect(self, launched):
        return forced(self.runner.collect(launched), self._positions.pop(id(launched))[1], self.references)
