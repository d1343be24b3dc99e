"""oracle: magnus planned with the true lengths, the upper bound of the grouping rule."""

from __future__ import annotations

from services.batcher.policy.families.magnus import Magnus


class Oracle(Magnus):
    """The simulator supplies true lengths; the batcher takes max_new_tokens as the true length (exact
    in trace replay, where a request stops there). Knowing them, it may fill all of Theta."""

    name = "oracle"
    plans_with_true_lengths = True
    can_preempt = False  # true lengths have no stragglers

    @property
    def fill_fraction(self) -> float:
        return 1.0

    def planned_gen_tokens(self, *, predicted_tokens: int, upper_tokens: int | None, max_new_tokens: int) -> int:
        return max(1, max_new_tokens)
