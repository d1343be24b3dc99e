"""How many tokens a step prompt-lookup drafting yields on the mix, per task (CPU, seconds).

    python bench/draft_acceptance.py --lengths var/serving/mix_lengths.jsonl --out reports/gpu

Each request of the mix (its real prompt and reference output in Qwen tokens, bench/serving_lengths.py
--data) is decoded as the paged engine decodes it with `draft_tokens` = k: the engine's own drafter
(`speculation.NgramIndex`) proposes up to k tokens from the prompt and the output so far, a model whose
greedy answer is the reference is asked to verify them (`speculation.accepted_tokens`), and the kept
tokens are appended. Tokens a step = output tokens / steps; a model's own answers differ from the
references, so this measures the references' overlap with their prompts, not a particular model.
Writes draft_acceptance.md and .json under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.worker.paged.speculation import NgramIndex, accepted_tokens  # noqa: E402


def steps_to_decode(prompt: list[int], reference: list[int], max_drafts: int) -> int:
    """Steps a request takes to produce `reference` when each step verifies up to max_drafts drafts."""
    index = NgramIndex()
    index.extend(prompt)
    done = steps = 0
    while done < len(reference):
        drafts = index.propose(min(max_drafts, len(reference) - done - 1))
        kept = accepted_tokens(drafts, reference[done:done + len(drafts) + 1])
        index.extend(kept)
        done += len(kept)
        steps += 1
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=Path, default=Path("var/serving/mix_lengths.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--requests", type=int, default=1200, help="the first N rows (bench/gpu_serving.py's phases)")
    parser.add_argument("--draft-tokens", default="2,4,8,16")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.lengths.read_text().splitlines()][:args.requests]
    if not rows or "output_ids" not in rows[0]:
        raise SystemExit(f"{args.lengths} has no token ids: make it with bench/serving_lengths.py --data")
    ks = [int(k) for k in args.draft_tokens.split(",")]
    result = dict(command="python " + " ".join(sys.argv), requests=len(rows), tokens_per_step={})
    for k in ks:
        tokens, steps = defaultdict(int), defaultdict(int)
        for row in rows:
            reference = row["output_ids"] or [0]  # an empty reference: the one token a replay still runs
            tokens[row["task"]] += len(reference)
            steps[row["task"]] += steps_to_decode(row["prompt_ids"], reference, k)
        per_task = {task: round(tokens[task] / steps[task], 2) for task in sorted(tokens)}
        per_task["all"] = round(sum(tokens.values()) / sum(steps.values()), 2)
        result["tokens_per_step"][str(k)] = per_task
        print(f"k={k}: {per_task}", flush=True)
    tasks = list(result["tokens_per_step"][str(ks[0])])
    lines = [f"`{result['command']}` (CPU; {len(rows)} requests of the mix, their reference outputs)", "",
             "Tokens a step with prompt-lookup drafts of up to k tokens (1.00 = no gain):", "",
             "| k | " + " | ".join(tasks) + " |", "|---:|" + "---:|" * len(tasks)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{result['tokens_per_step'][str(k)][t]:.2f}" for t in tasks) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft_acceptance.json").write_text(json.dumps(result, indent=1))
    (args.out / "draft_acceptance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
