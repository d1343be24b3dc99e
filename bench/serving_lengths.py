"""The 8-task mix's lengths with the serving predictor's predictions, for bench/gpu_serving.py (CPU).

    python bench/serving_lengths.py --workload var/e2e/workload.jsonl --data ../shared/data \
        --model var/e2e/state/model-store/predictor/v1.joblib --out var/serving/mix_lengths.jsonl

The GPU machine has no embedding model and the engine bench sends token ids, not text: so the
predictor runs here, once, on the same held-out rows `bench/gpu_e2e.py` replays (its first
version, as the services serve it), and the bench reads one line per request: prompt and true
output tokens (Qwen's tokenizer), the point prediction and the calibrated p90; and, with --data, the
prompt's and the reference output's Qwen token ids (`prompt_ids`, `output_ids`: the engine bench
drafts from the prompt and verifies against the reference, see paged/reference_runner.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import joblib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.dataset import find_task_files, read_task_rows  # noqa: E402
from services.shared.tokenizer import get_token_counter, join_prompt  # noqa: E402


def token_ids(rows: list[dict], data_dir: Path) -> list[dict]:
    """Per row, its prompt's and its reference output's token ids (the tokenizer that counted its lengths)."""
    references = {}
    for task, path in find_task_files(data_dir).items():
        references.update(((task, r.id), r.output_text) for r in read_task_rows(path))
    counter = get_token_counter()
    prompts = counter.encode_many([join_prompt(r["instruction"], r["user_input"]) for r in rows])
    outputs = counter.encode_many([references[(r["task"], r["id"])] for r in rows])
    for row, prompt, output in zip(rows, prompts, outputs, strict=True):
        if (len(prompt), max(1, len(output))) != (row["input_tokens"], row["gen_tokens"]):
            raise ValueError(f"{row['task']} {row['id']}: token ids disagree with the workload's lengths")
    return [dict(prompt_ids=prompt, output_ids=output) for prompt, output in zip(prompts, outputs, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", type=Path, default=Path("var/e2e/workload.jsonl"))
    parser.add_argument("--model", type=Path, default=Path("var/e2e/state/model-store/predictor/v1.joblib"))
    parser.add_argument("--out", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--data", type=Path, help="the task files: add each row's prompt and reference token ids")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.workload.read_text().splitlines() if line.strip()]
    ids = token_ids(rows, args.data) if args.data else [{}] * len(rows)
    model = joblib.load(args.model)["model"]
    point, _, calibrated = model.predict_quantiles([r["instruction"] for r in rows], [r["user_input"] for r in rows],
                                                   [r["input_tokens"] for r in rows], levels=(0.9,))
    p90 = calibrated.quantiles[:, 0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for row, predicted, upper, row_ids in zip(rows, point, p90, ids, strict=True):
            out.write(json.dumps(dict(task=row["task"], input_tokens=row["input_tokens"], gen_tokens=row["gen_tokens"],
                                      predicted_tokens=max(1, int(predicted)), p90_tokens=max(1, int(upper)))
                                 | row_ids) + "\n")
    truth = np.array([r["gen_tokens"] for r in rows], dtype=float)
    print(f"{len(rows)} rows -> {args.out}: MAE {np.mean(np.abs(point - truth)):.1f} tokens, "
          f"p90 coverage {np.mean(truth <= p90):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
