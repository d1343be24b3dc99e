"""The batcher tests' own event loop: the scheduler creates futures on it and tests run it by hand."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)
