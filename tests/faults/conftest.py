"""A real stack for fault injection: short leases, a slowed worker, no trainer, its own SQLite copy.

Every test here breaks one part (SIGKILL, a locked log DB, a restart) and leaves the stack healthy
for the next, so the module pays for one stack start.
"""

from __future__ import annotations

import pytest

from tests.stack_support import running_stack

FAULT_SERVICES = ("predictor", "estimator", "batcher", "worker")  # no trainer: it only adds load here
LEASE_S = 3.0

FAULT_ENV = {
    # a dead worker's batch comes back within seconds, and a restarted batcher is found quickly
    "MAGNUS_BATCHER_LEASE_S": str(LEASE_S),
    "MAGNUS_BATCHER_HEARTBEAT_INTERVAL_S": "0.5",
    "MAGNUS_BATCHER_WORKER_TIMEOUT_S": "10",
    "MAGNUS_BATCHER_PREDICTOR_DEADLINE_S": "0.5",
    "MAGNUS_BATCHER_DRAIN_TIMEOUT_S": "120",  # the drain ends when nothing is in flight; a busy machine needs long
    "MAGNUS_WORKER_PULL_WAIT_S": "1",
    "MAGNUS_WORKER_BACKOFF_MAX_S": "1",
    # test hook: each decode step 0.05 s slower, so a batch of 24 new tokens runs > 1 s (killable mid-way)
    "MAGNUS_WORKER_SLOWDOWN_STEP_S": "0.05",
}


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, prepared_stack_db):
    with running_stack(tmp_path_factory.mktemp("faults"), FAULT_SERVICES, env=FAULT_ENV,
                       prepared=prepared_stack_db) as stack:
        yield stack
