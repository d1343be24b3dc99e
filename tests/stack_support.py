"""Starting the real stack for one test module: its own SQLite log DB (fresh, or a copy of the prepared
one), the named services started and SERVING, stopped however the module ends."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tools.stack import REPO_ROOT, Stack

ASYNCIO_ERRORS = ("never retrieved", "destroyed but it is pending", "Exception in callback")


def run_python(args: list[str], timeout_s: float | None = None) -> str:
    """`python ARGS` from the repo root (a script path, or "-m", module, ...), as the Makefile or a user
    runs it; returns its stdout, or fails the test with the tail of its output."""
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def run_cli(*args: str) -> str:
    """A set-up CLI module (`python -m ARGS`) the way the Makefile runs it."""
    return run_python(["-m", *args])


@contextmanager
def running_stack(
    workdir: Path, names: tuple[str, ...], *, env: dict[str, str], prepared: tuple[Path, Path] | None = None,
    timeout_s: float = 180.0, **stack_args,
) -> Iterator[Stack]:
    """A Stack logging to `workdir/log.db` with `names` SERVING; every process is stopped on exit.

    `prepared` is the `prepared_stack_db` fixture's (log DB, model store): the DB is copied into
    `workdir` and the store is read in place. Without it the services start on an empty DB.
    """
    if prepared is not None:
        shutil.copy(prepared[0], workdir / "log.db")
        stack_args["model_store_dir"] = prepared[1]
    stack = Stack(workdir=workdir, database_url=f"sqlite+aiosqlite:///{workdir / 'log.db'}", extra_env=env,
                  **stack_args)
    try:
        for name in names:
            stack.start(name)
        stack.wait_healthy(names, timeout_s=timeout_s)
        yield stack
    finally:
        stack.stop_all()


def assert_no_asyncio_errors(stack: Stack, names: tuple[str, ...]) -> None:
    """No service's log holds an unretrieved task exception, a destroyed pending task or a failed callback."""
    for name in names:
        text = stack.log_path(name).read_text(errors="replace")
        found = [line for line in text.splitlines() if any(e in line for e in ASYNCIO_ERRORS)]
        assert found == [], f"{name} logged asyncio errors: {found[:5]}"
