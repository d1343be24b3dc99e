"""tools/stack.py with several workers: names, ports, ids and GPUs (no process started)."""

from __future__ import annotations

import pytest

from tools.stack import SERVICES, Stack


def test_one_worker_by_default_as_before(tmp_path):
    stack = Stack(workdir=tmp_path, database_url="sqlite+aiosqlite:///x.db")
    assert stack.worker_names == ("worker",)
    assert stack.names == SERVICES
    assert "MAGNUS_WORKER_WORKER_ID" not in stack._worker_env("worker")  # id stays <host>-<pid>


def test_each_worker_has_its_own_ports_id_and_gpu(tmp_path):
    stack = Stack(workdir=tmp_path, database_url="sqlite+aiosqlite:///x.db", num_workers=3,
                  worker_devices=("0", "1", "2"))
    assert stack.worker_names == ("worker", "worker-1", "worker-2")
    assert stack.names[-2:] == ("worker-1", "worker-2")
    envs = [stack._worker_env(name) for name in stack.worker_names]
    assert [e["MAGNUS_WORKER_WORKER_ID"] for e in envs] == list(stack.worker_names)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2"]
    ports = {int(e["MAGNUS_WORKER_PORT"]) for e in envs} | {int(e["MAGNUS_WORKER_METRICS_PORT"]) for e in envs}
    assert len(ports) == 6


def test_device_list_must_match_the_workers(tmp_path):
    with pytest.raises(ValueError):
        Stack(workdir=tmp_path, database_url="sqlite+aiosqlite:///x.db", num_workers=2, worker_devices=("0",))
    with pytest.raises(ValueError):
        Stack(workdir=tmp_path, database_url="sqlite+aiosqlite:///x.db", num_workers=0)
