"""TokenRelay: workers' deltas reach streamed callers once each, in order, only from the lease holder."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from services.batcher.token_relay import RequestDelta, TokenEvent, TokenRelay


def _request(request_id: str, is_streamed: bool = True):
    loop = asyncio.new_event_loop()
    return SimpleNamespace(request_id=request_id, events=asyncio.Queue() if is_streamed else None,
                           future=loop.create_future())


def _drain(request) -> list[TokenEvent]:
    events = []
    while not request.events.empty():
        events.append(request.events.get_nowait())
    return events


def test_deltas_are_relayed_in_order_once_and_only_from_the_lease_holder():
    streamed, quiet = _request("r1"), _request("r2", is_streamed=False)
    scheduler = SimpleNamespace(leases={"b1": SimpleNamespace(worker_id="w1", items=[streamed, quiet])})
    relay = TokenRelay(scheduler)
    assert relay.relay_report("w1", [("b1", [RequestDelta("r1", 0, 2, "你好"), RequestDelta("r2", 0, 1, "x")])]) == []
    # a resent report (the worker did not hear the answer) and a gap are dropped; the next one continues
    relay.relay("w1", "b1", [RequestDelta("r1", 0, 2, "你好")])
    relay.relay("w1", "b1", [RequestDelta("r1", 5, 1, "?")])
    relay.relay("w1", "b1", [RequestDelta("r1", 2, 3, " 🌍")])
    assert _drain(streamed) == [TokenEvent("你好", 2), TokenEvent(" 🌍", 3)]
    assert relay.num_dropped == 3  # r2 (not streamed), the resend, the gap
    # another worker, or a lease that ended, is stale
    assert relay.relay_report("w2", [("b1", [RequestDelta("r1", 5, 1, "!")])]) == ["b1"]
    del scheduler.leases["b1"]
    assert relay.relay_report("w1", [("b1", [RequestDelta("r1", 5, 1, "!")])]) == ["b1"]
    assert _drain(streamed) == [] and relay._relayed == {}


def test_answered_requests_get_no_more_tokens():
    request = _request("r1")
    request.future.set_result("done")
    relay = TokenRelay(SimpleNamespace(leases={"b1": SimpleNamespace(worker_id="w", items=[request])}))
    relay.relay("w", "b1", [RequestDelta("r1", 0, 1, "late")])
    assert _drain(request) == []
