"""gRPC servicers of the batcher: proto <-> domain, nothing more."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp

from magnus.v1 import generation_pb2, worker_queue_pb2
from services.batcher import metrics
from services.batcher.admission import Admission
from services.batcher.domain import (
    BatchReport,
    GenerationInput,
    ItemOutput,
    Lease,
    Phase,
    RequestResult,
    WorkerInfo,
)
from services.batcher.scheduler import Scheduler
from services.batcher.token_relay import RequestDelta, TokenEvent, TokenRelay
from services.shared.auth import current_caller, tenant_for
from services.shared.errors import InvalidArgument, Unavailable
from services.shared.validation import check_range, check_text

log = logging.getLogger(__name__)

# Most batches one PullBatch may lease or one CompleteBatches may report (the worker's rows bound it).
MAX_BATCHES_PER_CALL = 1024


def _generation_input(prompt: generation_pb2.Prompt) -> GenerationInput:
    """The domain request, accounted to the caller's tenant (auth.tenant_for: an API key's own)."""
    return GenerationInput(
        instruction=prompt.instruction,
        user_input=prompt.user_input,
        max_new_tokens=prompt.max_new_tokens,
        client_request_id=prompt.client_request_id,
        tenant_id=tenant_for(prompt.tenant_id, current_caller()),
    )


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def result_to_proto(result: RequestResult) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        request_id=result.request_id,
        text=result.text,
        generated_tokens=result.generated_tokens,
        predicted_tokens=result.predicted_tokens,
        input_tokens=result.input_tokens,
        batch_id=result.batch_id,
        batch_size=result.batch_size,
        is_prediction_fallback=result.is_prediction_fallback,
        timings=generation_pb2.RequestTimings(
            queued_at=_timestamp(result.queued_at),
            started_at=_timestamp(result.started_at),
            finished_at=_timestamp(result.finished_at),
            queue_wait_s=(result.started_at - result.queued_at).total_seconds(),
            run_s=(result.finished_at - result.started_at).total_seconds(),
        ),
    )


class GenerationServicer:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def _earlier_call(self, request) -> tuple[GenerationInput, RequestResult | None]:
        """The request's domain form, and the result of an earlier call with its idempotency key."""
        if not request.HasField("prompt"):
            raise InvalidArgument("prompt", "is required")
        generation = _generation_input(request.prompt)
        existing = await self._admission.earlier_result(generation)
        if existing is None or isinstance(existing, RequestResult):
            return generation, existing
        return generation, await asyncio.shield(existing)  # a retry must not cancel the first call

    async def Generate(self, request: generation_pb2.GenerateRequest, context) -> generation_pb2.GenerateResponse:
        generation, earlier = await self._earlier_call(request)
        if earlier is not None:
            return result_to_proto(earlier)
        pending = await self._admission.submit(
            generation, wants_events=False, time_remaining_s=context.time_remaining()
        )
        try:
            return result_to_proto(await asyncio.shield(pending.future))
        except asyncio.CancelledError:
            self._admission.cancel(pending)
            raise

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        generation, earlier = await self._earlier_call(request)
        if earlier is not None:
            yield _finished_event(earlier)
            return
        pending = await self._admission.submit(
            generation, wants_events=True, time_remaining_s=context.time_remaining()
        )
        stream = _StreamedOutput(pending.request_id, pending.prediction.predicted_tokens, pending.arrival_s)
        # Every event queued before the answer is sent before it, in order: the answer queues a marker
        # behind them (nothing is queued for a request once it is answered: token_relay, scheduler).
        # One queue read per event; waiting on the queue and the future together cost a task each.
        pending.future.add_done_callback(lambda _: pending.events.put_nowait(_ANSWERED))
        try:
            taken: object | None = None  # an event read past merged tokens: the next to send
            while (event := taken or await pending.events.get()) is not _ANSWERED:
                taken = None
                if isinstance(event, TokenEvent):
                    event, taken = _merge_queued_tokens(event, pending.events)
                yield stream.event(event)
            result = pending.future.result()
            tail = stream.tail(result)
            if tail is not None:
                yield tail
            stream.observe_finish(result)
            yield _finished_event(result)
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: the caller left while a message was sent
            self._admission.cancel(pending)
            raise


_ANSWERED = object()  # queued behind a streamed request's events once its answer is set


def _merge_queued_tokens(first: TokenEvent, events: asyncio.Queue) -> tuple[TokenEvent, object | None]:
    """`first` and the token events queued right behind it as one (a caller that reads slower than the
    worker reports gets fewer, larger messages: each costs gRPC ~80 us of the batcher's loop), and the
    first other event read, if any."""
    texts, num_tokens = [first.text_delta], first.num_tokens
    while not events.empty():
        event = events.get_nowait()
        if not isinstance(event, TokenEvent):
            return TokenEvent("".join(texts), num_tokens), event
        texts.append(event.text_delta)
        num_tokens += event.num_tokens
    return (first if len(texts) == 1 else TokenEvent("".join(texts), num_tokens)), None


_PHASES = {Phase.QUEUED: generation_pb2.REQUEST_PHASE_QUEUED, Phase.STARTED: generation_pb2.REQUEST_PHASE_STARTED}


class _StreamedOutput:
    """What one GenerateStream call sent: events out of the queue, the text and tokens streamed so far
    (their last delta comes from the final answer), and its caller's first-token and per-token times."""

    def __init__(self, request_id: str, predicted_tokens: int, arrival_s: float) -> None:
        self.request_id = request_id
        self.predicted_tokens = predicted_tokens
        self.arrival_s = arrival_s
        self.text = ""
        self.num_tokens = 0
        self.first_token_s: float | None = None

    def event(self, event: str | TokenEvent) -> generation_pb2.GenerateStreamResponse:
        if isinstance(event, TokenEvent):
            return self._tokens(event.text_delta, event.num_tokens)
        return generation_pb2.GenerateStreamResponse(
            phase=_PHASES[event], request_id=self.request_id, predicted_tokens=self.predicted_tokens
        )

    def _tokens(self, text_delta: str, num_tokens: int) -> generation_pb2.GenerateStreamResponse:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic()
            metrics.TIME_TO_FIRST_TOKEN.observe(max(0.0, self.first_token_s - self.arrival_s))
        self.text += text_delta
        self.num_tokens += num_tokens
        return generation_pb2.GenerateStreamResponse(
            phase=generation_pb2.REQUEST_PHASE_TOKENS, request_id=self.request_id,
            predicted_tokens=self.predicted_tokens, text_delta=text_delta, num_tokens=num_tokens,
            generated_tokens=self.num_tokens,
        )

    def tail(self, result: RequestResult) -> generation_pb2.GenerateStreamResponse | None:
        """The output not yet streamed (the worker's last few tokens, held bytes, or all of it when the
        worker streams nothing), so that the deltas add up to the answer's text."""
        if not result.text.startswith(self.text):  # cannot take back sent text (see README: a cut request)
            log.warning("request %s: streamed text is not a prefix of its answer", self.request_id)
            return None
        delta, num_tokens = result.text[len(self.text):], max(0, result.generated_tokens - self.num_tokens)
        if not delta and not num_tokens:
            return None
        return self._tokens(delta, num_tokens)

    def observe_finish(self, result: RequestResult) -> None:
        if self.first_token_s is not None and result.generated_tokens > 1:
            per_token_s = (time.monotonic() - self.first_token_s) / (result.generated_tokens - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.observe(per_token_s)


def _finished_event(result: RequestResult) -> generation_pb2.GenerateStreamResponse:
    return generation_pb2.GenerateStreamResponse(
        phase=generation_pb2.REQUEST_PHASE_FINISHED,
        request_id=result.request_id,
        predicted_tokens=result.predicted_tokens,
        result=result_to_proto(result),
    )


def lease_to_proto(lease: Lease) -> worker_queue_pb2.Batch:
    batch = lease.batch
    return worker_queue_pb2.Batch(
        batch_id=batch.batch_id,
        items=[
            worker_queue_pb2.BatchItem(
                request_id=r.request_id,
                prompt=r.lease_prompt,
                max_new_tokens=r.remaining_new_tokens,
                predicted_tokens=r.prediction.predicted_tokens,
                input_tokens=r.input_tokens_now,
                is_streamed=r.events is not None,
            )
            for r in lease.items
        ],
        input_tokens_max=batch.input_tokens_max,
        predicted_gen_tokens_max=batch.gen_tokens_max,
        estimated_s=lease.estimated_s,
        lease_s=lease.deadline_s - lease.started_s,
        preempt_max_rows=lease.preempt_max_rows,
    )


def _checked_report(request: worker_queue_pb2.CompleteBatchRequest) -> BatchReport:
    check_text("batch_id", request.batch_id, max_bytes=64)
    check_range("run_s", request.run_s, low=0, high=1e7)
    return BatchReport(
        outputs=[ItemOutput(r.request_id, r.text, r.generated_tokens, r.is_preempted) for r in request.results],
        run_s=request.run_s,
        valid_tokens=request.valid_tokens,
        total_tokens=request.total_tokens,
    )


class WorkerQueueServicer:
    def __init__(self, scheduler: Scheduler, *, lease_s: float, heartbeat_interval_s: float, max_wait_s: float) -> None:
        self._scheduler = scheduler
        self._relay = TokenRelay(scheduler)
        self._lease_s = lease_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self._max_wait_s = max_wait_s

    async def RegisterWorker(self, request, context) -> worker_queue_pb2.RegisterWorkerResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        check_range("kv_bytes_per_token", request.kv_bytes_per_token, low=1, high=2**40)
        check_range("free_kv_bytes", request.free_kv_bytes, low=1, high=2**60)
        check_range("max_batch_size", request.max_batch_size, low=0, high=1_000_000)
        check_range("max_context_tokens", request.max_context_tokens, low=0, high=2**31 - 1)
        check_text("incarnation_id", request.incarnation_id, max_bytes=64, may_be_empty=True)
        self._scheduler.register(
            WorkerInfo(
                worker_id=request.worker_id,
                kv_bytes_per_token=request.kv_bytes_per_token,
                free_kv_bytes=request.free_kv_bytes,
                max_batch_size=request.max_batch_size,
                model_name=request.model_name,
                device=request.device,
                last_seen_s=time.monotonic(),
                max_context_tokens=request.max_context_tokens,
                incarnation_id=request.incarnation_id,
            )
        )
        return worker_queue_pb2.RegisterWorkerResponse(
            lease_s=self._lease_s, heartbeat_interval_s=self._heartbeat_interval_s
        )

    async def PullBatch(self, request, context) -> worker_queue_pb2.PullBatchResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        check_range("wait_s", request.wait_s, low=0, high=3600)
        if request.worker_id not in self._scheduler.workers:
            raise Unavailable(f"worker {request.worker_id!r} is not registered; call RegisterWorker")
        check_range("max_batches", request.max_batches, low=0, high=MAX_BATCHES_PER_CALL)
        wait_s = min(request.wait_s or self._max_wait_s, self._max_wait_s)
        pulled = self._scheduler.pull(request.worker_id)
        if not isinstance(pulled, Lease):
            try:
                await asyncio.wait({pulled}, timeout=wait_s)
            finally:
                if not pulled.done():
                    self._scheduler.cancel_pull(pulled)
            if not pulled.done():
                return worker_queue_pb2.PullBatchResponse()
            pulled = pulled.result()
        more = self._scheduler.pull_ready(request.worker_id, max(0, request.max_batches - 1))
        return worker_queue_pb2.PullBatchResponse(
            batch=lease_to_proto(pulled), more_batches=[lease_to_proto(lease) for lease in more]
        )

    async def CompleteBatch(self, request, context) -> worker_queue_pb2.CompleteBatchResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        report = _checked_report(request)
        is_accepted = self._scheduler.complete(request.worker_id, request.batch_id, report)
        return worker_queue_pb2.CompleteBatchResponse(is_accepted=is_accepted)

    async def CompleteBatches(self, request, context) -> worker_queue_pb2.CompleteBatchesResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        check_range("completions", len(request.completions), low=1, high=MAX_BATCHES_PER_CALL)
        for index, completion in enumerate(request.completions):  # all checked before any is applied
            if completion.worker_id not in ("", request.worker_id):
                raise InvalidArgument(f"completions[{index}].worker_id", "must be empty or the request's worker_id")
        reports = [(c.batch_id, _checked_report(c)) for c in request.completions]
        return worker_queue_pb2.CompleteBatchesResponse(
            is_accepted=[self._scheduler.complete(request.worker_id, batch_id, report) for batch_id, report in reports]
        )

    async def ReportBatchFailure(self, request, context) -> worker_queue_pb2.ReportBatchFailureResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        check_text("batch_id", request.batch_id, max_bytes=64)
        if request.kind == worker_queue_pb2.FAILURE_KIND_UNSPECIFIED:
            raise InvalidArgument("kind", "must be set")
        is_accepted = self._scheduler.fail(
            request.worker_id,
            request.batch_id,
            is_out_of_memory=request.kind == worker_queue_pb2.FAILURE_KIND_OUT_OF_MEMORY,
            is_worker_stopping=request.kind == worker_queue_pb2.FAILURE_KIND_WORKER_STOPPING,
            message=request.message[:4096],
        )
        return worker_queue_pb2.ReportBatchFailureResponse(is_accepted=is_accepted)

    async def Heartbeat(self, request, context) -> worker_queue_pb2.HeartbeatResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        reply = self._scheduler.heartbeat(request.worker_id, request.batch_id)
        return worker_queue_pb2.HeartbeatResponse(
            is_lease_valid=reply.is_lease_valid,
            is_registered=reply.is_registered,
            cancelled_request_ids=reply.cancelled_request_ids,
        )

    async def StreamTokens(self, request, context) -> worker_queue_pb2.StreamTokensResponse:
        check_text("worker_id", request.worker_id, max_bytes=128)
        leases = [(lease.batch_id, [RequestDelta(r.request_id, r.token_offset, r.num_tokens, r.text_delta)
                                    for r in lease.requests]) for lease in request.leases]
        stale = self._relay.relay_report(request.worker_id, leases)
        return worker_queue_pb2.StreamTokensResponse(stale_batch_ids=stale)
