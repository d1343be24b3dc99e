"""Batcher settings (env prefix MAGNUS_BATCHER_)."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.batcher.policy.config import SERVING_POLICY_NAMES
from services.shared.settings import ServiceSettings


class BatcherSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MAGNUS_BATCHER_", extra="ignore", validate_by_name=True)

    port: int = Field(50051, ge=0, le=65535, description="gRPC port of the client API (GenerationService).")
    internal_port: int = Field(
        50061,
        ge=0,
        le=65535,
        description="gRPC port of the internal WorkerQueueService (workers only; keep it off the client network); "
        "0 picks a free one and logs it. The client port does not serve the internal API at all.",
    )
    predictor_target: str = Field("127.0.0.1:50052", description="host:port of the predictor.")
    estimator_target: str = Field("127.0.0.1:50053", description="host:port of the estimator.")
    policy: str = Field("magnus", description=f"Batching policy: one of {', '.join(SERVING_POLICY_NAMES)}.")
    phi_token_reads: float = Field(
        10_000.0,
        gt=0,
        description="WMA threshold Phi, KV-token reads. A request joins a batch only if the batch's "
        "WMA after insertion stays below it. Default from reports/simulation/phi_sweep (paper tasks, "
        "Qwen tokens); it scales with the workload's L + G, see that report.",
    )
    fixed_batch_size: int = Field(8, ge=1, description="Batch size of the fixed-size policies vs and glp.")
    max_batch_size: int = Field(256, ge=1, description="Ceiling on batch size for adaptive policies, requests.")
    memory_fill_fraction: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Share of Theta an adaptive batch may fill by *predicted* lengths; the rest absorbs "
        "under-predictions that would otherwise each cost an OOM split (0.85 in reports/simulation).",
    )
    pack_prefill_s_per_token: float = Field(
        27.9e-6, ge=0, description="magnus_pack's batch-time model: prefill seconds per padded prompt token "
        "(defaults: the static engine, Llama-2-7B shape on an H200; reports/gpu/engine.md)."
    )
    pack_step_base_s: float = Field(4.61e-3, gt=0, description="magnus_pack: seconds per decode step of any batch.")
    pack_step_s_per_row: float = Field(19.2e-6, ge=0, description="magnus_pack: decode-step seconds per row.")
    pack_step_s_per_kv_token: float = Field(
        111e-9, ge=0, description="magnus_pack: decode-step seconds per KV-cache token read."
    )
    max_pending_requests: int = Field(
        10_000, ge=1, description="Requests admitted but not answered; beyond it Generate gets RESOURCE_EXHAUSTED."
    )
    max_pending_per_tenant: int = Field(
        2_000,
        ge=0,
        description="Requests one tenant (with auth on, the API key's tenant; off, prompt.tenant_id, empty = the "
        "anonymous tenant) may have pending; beyond it that tenant gets RESOURCE_EXHAUSTED with a retry-after-s trailer while others are still admitted. 0 = off.",
    )
    max_instruction_bytes: int = Field(4096, ge=0, description="Largest instruction, UTF-8 bytes.")
    max_user_input_bytes: int = Field(65_536, ge=1, description="Largest user input, UTF-8 bytes.")
    max_input_tokens: int = Field(8192, ge=1, description="Largest prompt (instruction + input), tokens.")
    max_new_tokens_limit: int = Field(4096, ge=1, description="Largest max_new_tokens a client may ask for.")
    max_client_request_id_bytes: int = Field(128, ge=1, description="Largest idempotency key, bytes.")
    max_tenant_id_bytes: int = Field(64, ge=1, description="Largest tenant id, bytes.")
    lease_s: float = Field(30.0, gt=0, description="A leased batch not renewed within this is requeued, s.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often workers heartbeat, s.")
    worker_timeout_s: float = Field(90.0, gt=0, description="A worker silent this long is forgotten, s.")
    max_batch_failures: int = Field(
        3, ge=1, description="A failed batch of several requests is split in two (halving until the failing request "
        "runs alone, so its neighbours are answered); a request alone fails after this many failures, its "
        "batches' included. Lost leases (worker died) count too: a batch lost this often fails.",
    )
    max_context_tokens: int = Field(
        0, ge=0, description="Longest prompt + max_new_tokens admitted, tokens, besides the smallest context a "
        "registered worker announced (the lower applies); longer requests get INVALID_ARGUMENT naming "
        "prompt.max_new_tokens. Set it when workers may register after clients call; 0 = the workers' only.",
    )
    deadline_headroom: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Deadline-aware admission plans to answer within (1 - this) of the caller's remaining "
        "time: run-time estimates err, and on a 2-core machine under 3x overload with 5 s deadlines 0 let "
        "16 % of callers time out in the queue (reports/reliability.md). 0 = plan to the deadline itself.",
    )
    max_queue_wait_s: float = Field(
        600.0, ge=0, description="A request whose estimated queue wait (queued batches' estimated run time / "
        "lanes, policy/wait.py) exceeds this gets RESOURCE_EXHAUSTED with retry-after-s at once, as does one that "
        "would be answered (queue wait + its own run time) after its gRPC deadline. 600 s: longer than the e2e "
        "benchmarks' saturated queues take to drain, short enough that nobody waits ten minutes behind a "
        "backlog that does not clear; 0 = only the caller's deadline.",
    )
    preempt_share: float = Field(
        0.0, ge=0.0, le=0.5, description="Straggler preemption for policies that plan with predicted lengths: once "
        "a batch ran its planned G(B) steps and at most this share of its rows still runs, the worker cuts them "
        "and they are requeued with their output so far (reports/gpu/pack_offline.md). 0 = off.",
    )
    pull_wait_s: float = Field(10.0, gt=0, description="Longest PullBatch long-poll, s.")
    predictor_deadline_s: float = Field(1.0, gt=0, description="Deadline of a PredictLengths call, s.")
    predictor_window_s: float = Field(
        0.002, ge=0, description="How long admissions wait to share one PredictLengths call, s."
    )
    predictor_max_batch: int = Field(256, ge=1, description="Most queries in one PredictLengths call.")
    plan_quantile: float | None = Field(
        None, gt=0.0, lt=1.0, description="Plan each request at the predictor's calibrated quantile of this "
        "level (one of MAGNUS_PREDICTOR_QUANTILE_LEVELS, e.g. 0.9) instead of its point prediction; unset "
        "(the default) = the point prediction, as the paper plans. A predictor without that level is planned "
        "at its point prediction.",
    )
    estimator_deadline_s: float = Field(0.5, gt=0, description="Deadline of an EstimateBatchTime call, s.")
    estimate_idle_s: float = Field(0.5, gt=0, description="Estimate refresh period when nothing changes, s.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long queued work may keep running before it gets UNAVAILABLE, s."
    )
    idempotency_cache_size: int = Field(10_000, ge=0, description="Finished results kept for client retries.")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in SERVING_POLICY_NAMES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(SERVING_POLICY_NAMES)}")
        return value
