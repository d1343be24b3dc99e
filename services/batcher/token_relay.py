"""From the workers' StreamTokens reports to the streamed callers' event queues, in order.

The worker reports, per leased batch and request, the tokens generated since its last accepted
report (`token_offset` = tokens before them in this lease). A delta is relayed only when its lease
is still the worker's, its request still in the lease with a streaming caller, and it starts exactly
where the last relayed one ended: a resent or late report is dropped, never relayed twice. Like the
Scheduler, every method is synchronous (atomic on the event loop); the Scheduler owns leases and
requests, this relay only reads them and owns the per-lease offsets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.batcher import metrics
from services.batcher.scheduler import Scheduler


@dataclass(frozen=True)
class TokenEvent:
    """New output of a streamed request: put on its `events` queue after Phase.STARTED."""

    text_delta: str
    num_tokens: int


@dataclass(frozen=True)
class RequestDelta:
    request_id: str
    token_offset: int  # tokens this lease generated before the delta
    num_tokens: int
    text_delta: str


# the counter's two children, looked up once: labels() per delta was ~7 % of a streamed burst's loop
_RELAYED = metrics.STREAMED_TOKEN_REPORTS.labels(outcome="relayed")
_DROPPED = metrics.STREAMED_TOKEN_REPORTS.labels(outcome="dropped")


class TokenRelay:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._relayed: dict[str, dict[str, int]] = {}  # batch id -> request id -> tokens relayed in that lease
        self.num_relayed = 0
        self.num_dropped = 0

    def relay_report(self, worker_id: str, leases: Iterable[tuple[str, list[RequestDelta]]]) -> list[str]:
        """Relay one StreamTokens report: (batch id, its deltas) per lease. Returns the batch ids no
        longer leased to this worker (their deltas were dropped)."""
        self._forget_ended_leases()
        return [batch_id for batch_id, deltas in leases if not self.relay(worker_id, batch_id, deltas)]

    def relay(self, worker_id: str, batch_id: str, deltas: Iterable[RequestDelta]) -> bool:
        """Relay one lease's deltas; False when the batch is not (any more) leased to this worker."""
        lease = self._scheduler.leases.get(batch_id)
        if lease is None or lease.worker_id != worker_id:
            return False
        relayed = self._relayed.setdefault(batch_id, {})
        requests = {r.request_id: r for r in lease.items}
        num_relayed = num_dropped = 0
        for delta in deltas:
            request = requests.get(delta.request_id)
            if (request is None or request.events is None or request.future.done()
                    or delta.num_tokens < 1 or delta.token_offset != relayed.get(delta.request_id, 0)):
                num_dropped += 1
                continue
            relayed[delta.request_id] = delta.token_offset + delta.num_tokens
            request.events.put_nowait(TokenEvent(delta.text_delta, delta.num_tokens))
            num_relayed += 1
        self.num_relayed += num_relayed
        self.num_dropped += num_dropped
        _RELAYED.inc(num_relayed)
        _DROPPED.inc(num_dropped)
        return True

    def _forget_ended_leases(self) -> None:
        leases = self._scheduler.leases
        for batch_id in [b for b in self._relayed if b not in leases]:
            del self._relayed[batch_id]
