"""The bootstrap CLI and the id-grouped split, on a small slice of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.predictor import bootstrap
from services.core.dataset import find_task_files, is_test_id, read_task_rows
from services.shared.model_store import ModelStore

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_paired_tasks_split_on_the_same_side_by_id() -> None:
    files = find_task_files(DATA_DIR)
    zh2en = read_task_rows(files["mt_zh2en"], 300)
    en2zh = {row.id: row for row in read_task_rows(files["mt_en2zh"])}
    for row in zh2en:
        mirror = en2zh[row.id]
        assert mirror.input_text == row.output_text
        assert is_test_id(row.id, 0.2) == is_test_id(mirror.id, 0.2)
    share = sum(is_test_id(row.id, 0.2) for row in zh2en) / len(zh2en)
    assert 0.1 < share < 0.3


def test_missing_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_task_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no task files"):
        find_task_files(tmp_path)


@pytest.mark.asyncio
async def test_bootstrap_stores_a_pushed_version_with_metrics(db_url, store_dir, store: ModelStore, capsys) -> None:
    argv = ["--data", str(DATA_DIR), "--max-per-task", "150", "--database-url", db_url, "--model-store-dir", str(store_dir)]
    assert await bootstrap.run(bootstrap.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert "code_comment" in out and "stored predictor v1" in out
    loaded = await store.load("predictor", only_pushed=True)
    assert loaded.info.version == 1
    test_metrics = loaded.info.metrics["test"]
    assert set(test_metrics) >= {"mt_zh2en", "gec", "bugfix", "all"}
    assert 0 < test_metrics["all"]["acc_at_10pct"] <= 1
    assert loaded.info.num_train_samples == len(loaded.model.samples) > 500
    # the artifact keeps the text too, so the trainer can refit on old + new samples
    assert all(sample.input_text for sample in loaded.model.samples)

    assert await bootstrap.run(bootstrap.parse_args([*argv, "--if-missing"])) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (await store.find("predictor")).version == 1
