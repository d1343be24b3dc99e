"""Reading the task JSONL files (../shared/data) into length samples, split by id.

The paired tasks (mt_zh2en/mt_en2zh, code_trans_java2cs/cs2java) share ids, so the split is a
function of the id alone: a row and its mirror always land on the same side, and a test input is
never a training output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from services.core.length_model import LengthSample
from services.shared.tokenizer import TokenCounter, join_prompt

TASKS = (
    "mt_zh2en",
    "mt_en2zh",
    "gec",
    "detox",
    "code_trans_java2cs",
    "code_trans_cs2java",
    "bugfix",
    "code_comment",
)
COUNT_CHUNK_ROWS = 500


@dataclass(frozen=True, slots=True)
class TaskRow:
    task: str
    id: str
    instruction: str
    input_text: str
    output_text: str


def is_test_id(row_id: str, test_fraction: float) -> bool:
    """Deterministic split on the id alone (sha256, not Python's salted hash)."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode("utf-8")).digest()[:8], "big")
    return bucket / 2**64 < test_fraction


def read_task_rows(path: Path, max_rows: int | None = None) -> list[TaskRow]:
    """The first `max_rows` rows of one task file (the files are already shuffled)."""
    rows: list[TaskRow] = []
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                rows.append(
                    TaskRow(raw["task"], raw["id"], raw["instruction"], raw["input"], raw["output"])
                )
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{line_number}: not a task row ({error})") from error
    return rows


def find_task_files(data_dir: Path) -> dict[str, Path]:
    """Task name -> JSONL path for every known task present in `data_dir`."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    files = {task: data_dir / f"{task}.jsonl" for task in TASKS}
    present = {task: path for task, path in files.items() if path.is_file()}
    if not present:
        raise FileNotFoundError(f"no task files ({', '.join(TASKS)}).jsonl in {data_dir}")
    return present


def _chunks(rows: list[TaskRow], size: int) -> Iterator[list[TaskRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def to_samples(rows: list[TaskRow], counter: TokenCounter, *, show_progress: bool = True) -> list[LengthSample]:
    """Count prompt and output tokens; generation length = tokens of the reference output."""
    samples: list[LengthSample] = []
    with tqdm(total=len(rows), desc="counting tokens", unit="row", disable=not show_progress) as bar:
        for chunk in _chunks(rows, COUNT_CHUNK_ROWS):
            prompts = counter.count_many([join_prompt(r.instruction, r.input_text) for r in chunk])
            outputs = counter.count_many([r.output_text for r in chunk])
            samples.extend(
                LengthSample(r.instruction, r.input_text, p, o)
                for r, p, o in zip(chunk, prompts, outputs, strict=True)
            )
            bar.update(len(chunk))
    return samples


@dataclass(frozen=True, slots=True)
class Split:
    """Rows and their samples, train and test, split by id (see `is_test_id`)."""

    train_rows: list[TaskRow]
    train: list[LengthSample]
    test_rows: list[TaskRow]
    test: list[LengthSample]


def load_split(
    data_dir: Path, counter: TokenCounter, *, max_per_task: int | None, test_fraction: float, show_progress: bool = True
) -> Split:
    """Read every task file (the first `max_per_task` rows of each), count tokens, split by id."""
    rows = [r for path in find_task_files(data_dir).values() for r in read_task_rows(path, max_per_task)]
    samples = to_samples(rows, counter, show_progress=show_progress)
    is_test = [is_test_id(r.id, test_fraction) for r in rows]
    pairs = list(zip(rows, samples, is_test, strict=True))
    return Split(
        train_rows=[r for r, _, t in pairs if not t],
        train=[s for _, s, t in pairs if not t],
        test_rows=[r for r, _, t in pairs if t],
        test=[s for _, s, t in pairs if t],
    )
