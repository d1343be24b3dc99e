"""From a validated client request to its result: count, predict, admit, await.

Also owns the idempotency index: a retry carrying the same (tenant, client_request_id) joins the
first call's future instead of running again; finished results are kept in a bounded LRU. A key is
bound to its first request (GenerationInput.request_sha256): the same key with another prompt is
ALREADY_EXISTS, never the first prompt's answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from services.batcher.config import BatcherSettings
from services.batcher.domain import GenerationInput, PendingRequest, RequestResult
from services.batcher.predictor_client import PredictionCoalescer
from services.batcher.scheduler import Clock, Scheduler, new_id
from services.shared.errors import AlreadyExists, InvalidArgument
from services.shared.tokenizer import TokenCounter, join_prompt

log = logging.getLogger(__name__)


def validate_generation(generation: GenerationInput, settings: BatcherSettings) -> None:
    """Raise InvalidArgument naming the first bad field of a client request."""
    from services.shared.validation import check_range, check_text

    check_text("prompt.instruction", generation.instruction, max_bytes=settings.max_instruction_bytes, may_be_empty=True)
    check_text("prompt.user_input", generation.user_input, max_bytes=settings.max_user_input_bytes)
    if not generation.user_input.strip():
        raise InvalidArgument("prompt.user_input", "must not be blank")
    check_range("prompt.max_new_tokens", generation.max_new_tokens, low=1, high=settings.max_new_tokens_limit)
    check_text(
        "prompt.client_request_id",
        generation.client_request_id,
        max_bytes=settings.max_client_request_id_bytes,
        may_be_empty=True,
    )
    check_text("prompt.tenant_id", generation.tenant_id, max_bytes=settings.max_tenant_id_bytes, may_be_empty=True)


class Admission:
    def __init__(
        self,
        scheduler: Scheduler,
        coalescer: PredictionCoalescer,
        counter: TokenCounter,
        settings: BatcherSettings,
        clock: Clock,
        logged_result: Callable[[str, str], Awaitable[tuple[RequestResult, str] | None]] | None = None,
    ) -> None:
        """logged_result(tenant, client_request_id): a result the log DB kept from before a restart,
        with its request's request_sha256."""
        self._logged_result = logged_result
        self._scheduler = scheduler
        self._coalescer = coalescer
        self._counter = counter
        self._settings = settings
        self._clock = clock
        # (tenant, client_request_id) -> (request_sha256 of the first call, its future / result)
        self._in_flight: dict[tuple[str, str], tuple[str, asyncio.Future[RequestResult]]] = {}
        self._finished: OrderedDict[tuple[str, str], tuple[str, RequestResult]] = OrderedDict()

    def existing(self, generation: GenerationInput) -> asyncio.Future[RequestResult] | RequestResult | None:
        """The first call's future or result for a retried idempotency key, else None.

        Raises AlreadyExists when the key belongs to a different request.
        """
        if not generation.client_request_id:
            return None
        key = (generation.tenant_id, generation.client_request_id)
        found = self._in_flight.get(key) or self._finished.get(key)
        if found is None:
            return None
        first_sha256, answer = found
        _check_same_request(generation, first_sha256)
        return answer

    async def earlier_result(self, generation: GenerationInput) -> asyncio.Future[RequestResult] | RequestResult | None:
        """Like `existing`, and also asks the log DB, which outlives a batcher restart.

        Checked again after the DB answers: a concurrent retry may have been admitted meanwhile.
        A DB error only means no earlier result is known: the request runs.
        """
        found = self.existing(generation)
        if found is not None or not generation.client_request_id or self._logged_result is None:
            return found
        try:
            logged = await self._logged_result(generation.tenant_id, generation.client_request_id)
        except Exception:  # noqa: BLE001 - the log DB being down must not block serving
            log.warning("log DB lookup of a retried request id failed; running the request", exc_info=True)
            logged = None
        found = self.existing(generation)
        if found is not None or logged is None:
            return found
        logged_result, logged_sha256 = logged
        _check_same_request(generation, logged_sha256)
        return logged_result

    async def submit(
        self, generation: GenerationInput, *, wants_events: bool, time_remaining_s: float | None = None
    ) -> PendingRequest:
        """Validate against token limits, predict, and queue. Returns the pending request.

        time_remaining_s: the caller's gRPC deadline from now (None = none); a request that would not
        be answered in time is refused with RESOURCE_EXHAUSTED instead of queued (Scheduler.check_wait).
        """
        deadline_s = None if time_remaining_s is None else self._clock.monotonic_s() + time_remaining_s
        validate_generation(generation, self._settings)
        self._scheduler.check_capacity(generation.tenant_id)  # fail fast, before spending a prediction
        prompt = join_prompt(generation.instruction, generation.user_input)
        input_tokens = self._counter.count(prompt)
        if input_tokens > self._settings.max_input_tokens:
            raise InvalidArgument(
                "prompt.user_input",
                f"prompt is {input_tokens} tokens, the limit is {self._settings.max_input_tokens}",
            )
        # a request longer than a worker's context would fail its whole batch: refuse it here
        self._scheduler.check_context(input_tokens, generation.max_new_tokens)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RequestResult] = loop.create_future()
        if generation.client_request_id:
            self._remember(generation, future)  # before any await, so a concurrent retry finds it
        try:
            prediction = await self._coalescer.predict(
                generation.instruction, generation.user_input, input_tokens, generation.max_new_tokens
            )
            request = PendingRequest(
                request_id=new_id(),
                generation=generation,
                prediction=prediction,
                prompt=prompt,
                arrival_s=self._clock.monotonic_s(),
                queued_at=self._clock.wall(),
                future=future,
                events=asyncio.Queue() if wants_events else None,
                deadline_s=deadline_s,
            )
            self._scheduler.admit(request)
        except BaseException as error:
            if not future.done():
                future.set_exception(error if isinstance(error, Exception) else asyncio.CancelledError())
                future.exception()  # retrieved here; duplicates awaiting it still see the error
            raise
        return request

    def cancel(self, request: PendingRequest) -> None:
        """The caller left: drop the request, queued or running (the worker is told to stop it)."""
        stage = self._scheduler.cancel(request.request_id)
        if stage is not None:
            log.info("request %s dropped while %s: its caller left", request.request_id, stage)

    def _remember(self, generation: GenerationInput, future: asyncio.Future[RequestResult]) -> None:
        key = (generation.tenant_id, generation.client_request_id)
        request_sha256 = generation.request_sha256()
        self._in_flight[key] = (request_sha256, future)

        def on_done(done: asyncio.Future[RequestResult]) -> None:
            self._in_flight.pop(key, None)
            if done.cancelled() or done.exception() is not None:
                return  # a failed request may be retried for real
            self._finished[key] = (request_sha256, done.result())
            while len(self._finished) > self._settings.idempotency_cache_size:
                self._finished.popitem(last=False)

        future.add_done_callback(on_done)


def _check_same_request(generation: GenerationInput, first_sha256: str) -> None:
    """Raise AlreadyExists unless `generation` is the request its idempotency key was first used for."""
    if generation.request_sha256() != first_sha256:
        raise AlreadyExists(
            f"prompt.client_request_id {generation.client_request_id!r} was already used for a different request "
            "(instruction, user_input or max_new_tokens differ); a new request needs a new id"
        )
