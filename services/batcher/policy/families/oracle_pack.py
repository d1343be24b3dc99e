"""oracle_pack: magnus_pack planned with the true lengths (its upper bound)."""

from __future__ import annotations

from services.batcher.policy.families.magnus_pack import MagnusPack


class OraclePack(MagnusPack):
    name = "oracle_pack"
    plans_with_true_lengths = True
    can_preempt = False

    @property
    def fill_fraction(self) -> float:
        return 1.0

    def planned_gen_tokens(self, *, predicted_tokens: int, upper_tokens: int | None, max_new_tokens: int) -> int:
        return max(1, max_new_tokens)
