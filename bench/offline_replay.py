"""Shared by the offline benches (pack_offline, continuous_offline): the workload sample with the
served predictor's lengths for it, and the report files they write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np


@dataclass(frozen=True)
class Replay:
    """The first requests of a workload (bench/e2e_workload.py) and a stored predictor version."""

    model: object
    instructions: list[str]
    inputs: list[str]
    input_tokens: np.ndarray
    true_gen: np.ndarray

    def predicted(self, quantile: float | None = None) -> np.ndarray:
        """The point prediction per request, or with `quantile` the forest's upper estimate."""
        point, upper = self.model.predict_with_upper(self.instructions, self.inputs, list(self.input_tokens),
                                                     quantile=quantile)
        return np.asarray(point if quantile is None else upper)


def load_replay(predictor: Path, workload: Path, requests: int) -> Replay:
    rows = [json.loads(line) for line in workload.read_text(encoding="utf-8").splitlines()][:requests]
    return Replay(
        model=joblib.load(predictor)["model"],
        instructions=[r["instruction"] for r in rows],
        inputs=[r["user_input"] for r in rows],
        input_tokens=np.array([r["input_tokens"] for r in rows]),
        true_gen=np.array([r["gen_tokens"] for r in rows]),
    )


def write_report(out: Path, stem: str, results: dict, lines: list[str]) -> None:
    """OUT/stem.json (the numbers) and OUT/stem.md (the table), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
