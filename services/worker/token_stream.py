"""Streaming hand-off: the engine's new tokens, detokenized and sent to the batcher in batches.

Runners (the static engine, the continuous batcher, later the paged runner) see only `TokenSink`:
once per decode step (or every few steps) they hand over the new token ids of the rows they run,
from their own thread, at the cost of a dict lookup and a list append under a lock. The worker's
event loop owns the rest: `TokenStream` keeps, per streamed request, the ids not yet reported and an
incremental detokenizer, and `TokenStreamer` sends everything new every `interval_s` in ONE
StreamTokens call for all of the worker's leases (never one call per token, nor per row). A report
that fails is merged into the next one (offsets only advance once the batcher accepted it), so the
batcher sees every token of a request in order, exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from magnus.v1 import worker_queue_pb2 as pb
from magnus.v1 import worker_queue_pb2_grpc as pb_grpc
from services.shared.detokenize import Decoder, IncrementalDetokenizer

log = logging.getLogger(__name__)


class TokenSink(Protocol):
    """Where a runner puts new tokens. Called from the runner's thread; must never block on I/O."""

    def add_tokens(self, new_tokens: Mapping[str, Sequence[int]]) -> None:
        """request id -> its token ids generated since the last call, in order (stop token included,
        nothing after a row's stop or limit). Unknown (unstreamed) ids are ignored."""


class RowStream:
    """Feeds a sink from a batch whose rows decode together (a static batch): per row only its own
    tokens, nothing after its stop token or its limit (the engine keeps stepping finished rows)."""

    def __init__(self, sink: TokenSink, request_ids: Sequence[str | None], limits: Sequence[int],
                 stop_ids: set[int]) -> None:
        """request_ids: per row, None for a row nobody streams."""
        self._sink = sink
        self._request_ids = list(request_ids)
        self._limits = list(limits)
        self._stop_ids = stop_ids
        self._counts = [0] * len(self._request_ids)
        self._is_done = [request_id is None for request_id in self._request_ids]

    @classmethod
    def maybe(cls, sink: TokenSink | None, request_ids: Sequence[str | None], limits: Sequence[int],
              stop_ids: set[int]) -> RowStream | None:
        if sink is None or all(r is None for r in request_ids):
            return None
        return cls(sink, request_ids, limits, stop_ids)

    def push(self, rows_tokens: Sequence[Sequence[int]]) -> None:
        """Per row (in batch order), the tokens it generated since the last push."""
        new_tokens: dict[str, list[int]] = {}
        for row, tokens in enumerate(rows_tokens):
            if self._is_done[row]:
                continue
            kept: list[int] = []
            for token in tokens:
                kept.append(token)
                self._counts[row] += 1
                if token in self._stop_ids or self._counts[row] >= self._limits[row]:
                    self._is_done[row] = True
                    break
            if kept:
                new_tokens[self._request_ids[row]] = kept
        if new_tokens:
            self._sink.add_tokens(new_tokens)


@dataclass
class _Request:
    batch_id: str
    detokenizer: IncrementalDetokenizer
    new_ids: list[int] = field(default_factory=list)  # from the runner thread, under the lock
    reported_tokens: int = 0  # accepted by the batcher
    unsent_tokens: int = 0  # detokenized, not yet accepted
    unsent_text: str = ""


class TokenStream:
    """Per-request buffers of the worker's streamed requests. `add_tokens` from any thread; the rest
    from the event loop (one flusher)."""

    def __init__(self, tokenizer: Decoder) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}

    def open(self, batch_id: str, request_ids: Iterable[str]) -> None:
        """Start streaming these requests of a leased batch (before the runner sees them)."""
        with self._lock:
            for request_id in request_ids:
                self._requests[request_id] = _Request(batch_id, IncrementalDetokenizer(self._tokenizer))

    def close(self, batch_id: str) -> None:
        """The batch ended (reported, failed or lost): forget its requests, sent or not (the batcher
        answers with the whole text)."""
        with self._lock:
            for request_id in [r for r, s in self._requests.items() if s.batch_id == batch_id]:
                del self._requests[request_id]

    @property
    def num_open(self) -> int:
        return len(self._requests)

    def add_tokens(self, new_tokens: Mapping[str, Sequence[int]]) -> None:
        with self._lock:
            for request_id, ids in new_tokens.items():
                state = self._requests.get(request_id)
                if state is not None:
                    state.new_ids.extend(ids)

    def take_report(self, worker_id: str) -> pb.StreamTokensRequest | None:
        """Everything not yet accepted, per lease; None when nothing is new."""
        with self._lock:
            fresh = [(request_id, state, state.new_ids) for request_id, state in self._requests.items()]
            for _, state, _ in fresh:
                state.new_ids = []
        leases: dict[str, pb.LeaseTokens] = {}
        for request_id, state, ids in fresh:
            if ids:
                state.unsent_text += state.detokenizer.push(ids)
                state.unsent_tokens += len(ids)
            if state.unsent_tokens:
                lease = leases.setdefault(state.batch_id, pb.LeaseTokens(batch_id=state.batch_id))
                lease.requests.append(pb.RequestTokens(
                    request_id=request_id, token_offset=state.reported_tokens,
                    num_tokens=state.unsent_tokens, text_delta=state.unsent_text,
                ))
        if not leases:
            return None
        return pb.StreamTokensRequest(worker_id=worker_id, leases=list(leases.values()))

    def accepted(self, report: pb.StreamTokensRequest, stale_batch_ids: Iterable[str] = ()) -> None:
        """The batcher took `report`: advance the offsets of what it carried; forget stale leases."""
        with self._lock:
            for lease in report.leases:
                for sent in lease.requests:
                    state = self._requests.get(sent.request_id)
                    if state is None or state.reported_tokens != sent.token_offset:
                        continue
                    state.reported_tokens += sent.num_tokens
                    state.unsent_tokens -= sent.num_tokens
                    state.unsent_text = state.unsent_text[len(sent.text_delta):]
        for batch_id in stale_batch_ids:
            self.close(batch_id)


class TokenStreamer:
    """The flusher: one StreamTokens call per `interval_s` while any streamed request is open."""

    def __init__(self, stub: pb_grpc.WorkerQueueServiceStub, stream: TokenStream, worker_id: str,
                 interval_s: float = 0.05, rpc_timeout_s: float = 5.0) -> None:
        self.stub = stub
        self.stream = stream
        self.worker_id = worker_id
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.num_reports = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="token-streamer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        report = self.stream.take_report(self.worker_id) if self.stream.num_open else None
        if report is None:
            return
        try:
            response = await self.stub.StreamTokens(report, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as error:  # kept: the next report carries it again
            log.warning("StreamTokens failed (%s); resending with the next report", error.code().name)
            return
        self.num_reports += 1
        self.stream.accepted(report, response.stale_batch_ids)
