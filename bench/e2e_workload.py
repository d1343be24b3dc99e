"""Sample the end-to-end benchmark's workload from the task files: the 8 tasks mixed, real lengths.

Rows come from the predictor's held-out split (`is_test_id(id, 0.2)`, the split its bootstrap
trains around), an even share per task, shuffled. Each row keeps the prompt and its true lengths
in Qwen tokens (the serving tokenizer of the benchmark model): `input_tokens` of
instruction + "\\n" + input and `gen_tokens` of the reference output, which trace replay stops at.
Rows whose prompt + output exceed `--max-total-tokens` (the model's context) are dropped and
counted. The output is a JSONL file that travels to the GPU machine (not committed: it is data).

    python bench/e2e_workload.py --data ../shared/data --num-requests 3000 --out var/e2e/workload.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.dataset import find_task_files, is_test_id, read_task_rows  # noqa: E402
from services.shared.tokenizer import get_token_counter, join_prompt  # noqa: E402

TEST_FRACTION = 0.2  # the predictor bootstrap's default split
SEED = 0


def sample_rows(data_dir: Path, num_requests: int, max_total_tokens: int, seed: int = SEED) -> tuple[list[dict], Counter]:
    """An even mix of held-out rows per task with their token lengths; also the dropped count per task."""
    counter = get_token_counter()
    task_files = find_task_files(data_dir)
    per_task = -(-num_requests // len(task_files))
    rng = random.Random(seed)
    rows, dropped = [], Counter()
    for task, path in sorted(task_files.items()):
        held_out = [r for r in read_task_rows(path) if is_test_id(r.id, TEST_FRACTION)]
        rng.shuffle(held_out)
        candidates = held_out[: 2 * per_task]
        prompts = [join_prompt(r.instruction, r.input_text) for r in candidates]
        input_tokens = counter.count_many(prompts)
        gen_tokens = counter.count_many([r.output_text for r in candidates])
        kept = 0
        for row, n_in, n_gen in zip(candidates, input_tokens, gen_tokens, strict=True):
            if kept == per_task:
                break
            if n_in + max(1, n_gen) > max_total_tokens:
                dropped[task] += 1
                continue
            rows.append(dict(task=task, id=row.id, instruction=row.instruction, user_input=row.input_text,
                             input_tokens=n_in, gen_tokens=max(1, n_gen)))
            kept += 1
    rng.shuffle(rows)
    return rows[:num_requests], dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--num-requests", type=int, default=3000)
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="prompt + output limit (model context)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows, dropped = sample_rows(args.data, args.num_requests, args.max_total_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    by_task = Counter(r["task"] for r in rows)
    print(f"{len(rows)} requests -> {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    for task in sorted(by_task):
        task_rows = [r for r in rows if r["task"] == task]
        mean_in = sum(r["input_tokens"] for r in task_rows) / len(task_rows)
        mean_gen = sum(r["gen_tokens"] for r in task_rows) / len(task_rows)
        print(f"  {task:20s} {by_task[task]:5d} rows  input {mean_in:7.1f}  output {mean_gen:7.1f} tokens"
              f"  (dropped as too long: {dropped[task]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
