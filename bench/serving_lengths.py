"""The 8-task mix's lengths with the serving predictor's predictions, for bench/gpu_serving.py (CPU).

    python bench/serving_lengths.py --workload var/e2e/workload.jsonl \
        --model var/e2e/state/model-store/predictor/v1.joblib --out var/serving/mix_lengths.jsonl

The GPU machine has no embedding model and the engine bench sends token ids, not text: so the
predictor runs here, once, on the same held-out rows `bench/gpu_e2e.py` replays (its first
version, as the services serve it), and the bench reads one line per request: prompt and true
output tokens (Qwen's tokenizer), the point prediction and the calibrated p90.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--model", type=Path, default=Path("var/e2e/state/model-store/predictor/v1.joblib"))
    parser.add_argument("--out", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    model = joblib.load(args.model)["model"]
    point, _, calibrated = model.predict_quantiles([r["instruction"] for r in rows], [r["user_input"] for r in rows],
                                                   [r["input_tokens"] for r in rows], levels=(0.9,))
    p90 = calibrated.quantiles[:, 0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for row, predicted, upper in zip(rows, point, p90, strict=True):
            out.write(json.dumps(dict(task=row["task"], input_tokens=row["input_tokens"], gen_tokens=row["gen_tokens"],
                                      predicted_tokens=max(1, int(predicted)), p90_tokens=max(1, int(upper)))) + "\n")
    truth = np.array([r["gen_tokens"] for r in rows], dtype=float)
    print(f"{len(rows)} rows -> {args.out}: MAE {np.mean(np.abs(point - truth)):.1f} tokens, "
          f"p90 coverage {np.mean(truth <= p90):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
