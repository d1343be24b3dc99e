"""Worker settings: environment variables prefixed MAGNUS_WORKER_ (model: MAGNUS_MODEL)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings

GIB = 1024**3


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(ServiceSettings):
    """One worker process: one model on one device, pulling batches from the batcher."""

    model_config = SettingsConfigDict(env_prefix="MAGNUS_WORKER_", extra="ignore", validate_by_name=True)

    port: int = Field(50055, ge=0, le=65535, description="Port of the worker's health server; 0 picks a free one.")
    batcher_target: str = Field(
        "127.0.0.1:50061",
        description="host:port of the batcher's WorkerQueueService: its internal port (MAGNUS_BATCHER_INTERNAL_PORT).",
    )
    worker_id: str = Field(
        default_factory=default_worker_id,
        min_length=1,
        max_length=128,
        description="Stable id announced to the batcher (<= 128 bytes); default <hostname>-<pid>.",
    )
    model: str = Field(
        "",
        validation_alias=AliasChoices("MAGNUS_MODEL", "model"),
        description="Local HF causal-LM folder (MAGNUS_MODEL); empty = build/serve the tiny random Qwen2.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when torch sees a GPU, else cpu.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and KV dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    kv_budget_bytes: int = Field(
        2 * GIB, gt=0, description="Theta announced on CPU (KV-cache memory the batcher may plan with), bytes."
    )
    cuda_reserve_bytes: int = Field(
        1 * GIB, ge=0, description="On CUDA, free memory after loading kept out of Theta for activations, bytes."
    )
    max_batch_size: int = Field(0, ge=0, description="Largest batch accepted, requests; 0 = no limit of its own.")
    max_context_tokens: int = Field(
        0, ge=0, le=2**31 - 1, description="Longest prompt + max_new_tokens announced to the batcher, tokens, which "
        "refuses longer requests at admission; 0 = the model's max_position_embeddings (lower it when the "
        "device cannot hold a request that long alone).",
    )
    pull_wait_s: float = Field(5.0, gt=0, description="Long-poll time of one PullBatch, seconds.")
    max_concurrent_pulls: int = Field(
        8, ge=1, le=64, description="Continuous mode: PullBatch calls in flight at once, at most one per free row "
        "(one-request leases arrive one round trip apart per call).")
    max_batches_per_pull: int = Field(
        16, ge=1, le=1024, description="Continuous mode: batches one PullBatch may lease (the first waited for, "
        "the rest only if ready), at most one per free row; 1 = one per call (an older batcher gives one anyway).")
    rpc_timeout_s: float = Field(5.0, gt=0, description="Deadline of every RPC except PullBatch's wait, seconds.")
    gil_switch_interval_s: float = Field(
        0.0, ge=0, le=0.1, description="sys.setswitchinterval for the worker process, seconds: how long the engine "
        "thread may wait for the GIL while the event loop (gRPC, leases) holds it, and the reverse; 0 = Python's "
        "default (5 ms). On an H200 1 ms served a burst faster in one run but made steps with joiners 2x slower at "
        "12 req/s (reports/gpu/serving_e2e_ab): a knob to measure with.")
    heartbeat_interval_s: float = Field(
        2.0, gt=0, description="Heartbeat interval used when the batcher does not name one, seconds."
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, description="First retry delay when the batcher is unreachable, seconds."
    )
    backoff_max_s: float = Field(10.0, gt=0, description="Cap of the exponential retry delay, seconds.")
    slowdown_factor: float = Field(
        1.0, ge=1.0, description="Test hook: every batch takes this many times its run time (a slower device); 1 = off."
    )
    slowdown_step_s: float = Field(
        0.0, ge=0.0, description="Test hook: every batch takes this many seconds longer per decode step; 0 = off."
    )
    simulate_oom_above_tokens: int = Field(
        0, ge=0, description="Test hook: report OOM for batches with size x (L + max new) above this, tokens; 0 = off."
    )
    backend: Literal["auto", "hf", "static", "paged"] = Field(
        "auto",
        description="Generation backend: hf = plain transformers generate; static = preallocated KV pool with "
        "decode steps replayed as CUDA graphs (Llama-family models); auto = static on CUDA when supported; "
        "paged = the paged continuous engine (issue 23: KV in blocks, admission by predicted length, chunked "
        "prefill in every step; Llama-family models, continuous mode only).",
    )
    paged_block_tokens: int = Field(16, ge=1, description="Paged backend: tokens per KV block (a power of two).")
    paged_max_running: int = Field(
        256, ge=1, description="Paged backend: requests running at once (rows of a step); the worker keeps this "
        "many in hand, so it is also the batch size it announces.",
    )
    paged_token_budget: int = Field(
        2048, ge=1, description="Paged backend: tokens one step computes, decode rows plus prefill chunks; a "
        "longer prompt is prefilled over several steps. At least paged_max_running.",
    )
    admission: Literal["predicted", "greedy"] = Field(
        "predicted", description="Paged backend: predicted = a request joins while the KV pool is predicted to "
        "hold it and the running requests to their predicted ends (x admission_margin); greedy = while the "
        "pool holds its prompt (vLLM's), preempting later when blocks run out.",
    )
    admission_margin: float = Field(
        1.2, gt=0, description="Paged backend, predicted admission: predicted output tokens are planned for at "
        "this multiple (a stand-in for a quantile of the predictor's error).",
    )
    paged_order: Literal["fcfs", "hrrn", "hrrn_tail"] = Field(
        "fcfs", description="Paged backend: order among waiting requests: fcfs = as leased (the batcher's "
        "policy order), hrrn = highest (waited + predicted steps) / predicted steps first, hrrn_tail = hrrn "
        "after the requests predicted to outlast the queue's drain, longest first (a burst ends sooner, "
        "its mean latency is higher).",
    )
    paged_preempt_rule: Literal["most_work_left", "youngest"] = Field(
        "most_work_left", description="Paged backend: which running request is preempted when blocks run out "
        "(it resumes later by recompute): the most predicted output left, or the last admitted.",
    )
    paged_draft_tokens: int = Field(
        0, ge=0, description="Paged backend: speculative decoding by prompt lookup, up to this many drafted tokens "
        "a step per decoding request, verified in the step (the output is the same greedy text, in fewer steps where "
        "the answer copies its prompt: bug fixes, corrections, code translation); 0 = off. Steps that may draft "
        "are not overlapped.",
    )
    paged_draft_max_rows: int = Field(
        16, ge=1, description="Paged backend with paged_draft_tokens: draft only while at most this many requests "
        "run (a step of few rows is bound by reading the weights, so verifying drafts costs little there).",
    )
    use_cuda_graphs: bool = Field(True, description="Capture and replay decode steps (static backend, CUDA only).")
    paged_overlap: bool = Field(
        True, description="Paged backend: plan and launch step N+1 while step N runs on the device, so the host's "
        "work between steps is hidden (a request that stops at N computes one token more, dropped). On: +10-16 % "
        "burst throughput on an H200 (reports/gpu/serving_ab run 5); off: one step at a time.",
    )
    paged_mixed_graphs: bool = Field(
        True, description="Paged backend with use_cuda_graphs: also capture the steps that hold prefill chunks, one "
        "graph per token bucket up to paged_token_budget (captured at start-up); off: those steps run eagerly.",
    )
    max_cuda_graphs: int = Field(
        1024, ge=1, description="Captured decode steps kept (one per batch size and 32-token length bucket)."
    )
    graph_length_bucket_tokens: int = Field(
        32, ge=1, description="Decode attention length is rounded up to this multiple: one graph per bucket and "
        "batch size. Larger = fewer captures while serving, more masked KV reads per step.",
    )
    batch_bucket_rows: int = Field(
        8, ge=1, description="Static backend: a batch runs padded to the next multiple of this many rows (powers of "
        "two below it) when the KV pool holds the padded batch; one set of graphs and compiled kernels per bucket "
        "instead of per batch size. 1 = off (layer pieces then compiled once for all shapes).",
    )
    warmup_batch_rows: int = Field(
        256, ge=0, description="Static backend on CUDA: before registering, compile and capture every batch "
        "bucket up to this many rows (seconds per bucket), so no served batch waits for it; 0 = off.",
    )
    warmup_attend_tokens: int = Field(
        512, ge=0, description="CUDA: at start-up also capture each warmed batch bucket's (and in continuous mode "
        "the running batch's) decode graphs for every attention-length bucket up to this many tokens; longer "
        "batches capture theirs when first met. 0 = first bucket only.",
    )
    mode: Literal["static", "continuous"] = Field(
        "static",
        description="static = run each leased batch to its end (the paper's static batching); continuous = "
        "keep `continuous_slots` rows decoding and join each pulled request as soon as a row frees (FCFS "
        "continuous batching; pair with the batcher's `ccb` policy). Continuous needs the static backend.",
    )
    continuous_slots: int = Field(
        64, ge=1, description="Rows of the running batch in continuous mode; each holds KV for Theta / slots "
        "tokens (a longer request runs alone once the rows drained)."
    )
    stream_interval_ms: float = Field(
        50.0, ge=0, le=10_000,
        description="Streamed requests (GenerateStream callers): their new tokens go to the batcher at most "
        "this often, in one StreamTokens call for every batch in hand, milliseconds; 0 = never stream (the "
        "answer still comes whole).",
    )
    calibrate_grid: Literal["", "small", "full", "gpu"] = Field(
        "",
        description="Before registering, time the engine over this grid of batch shapes and store the samples "
        "for the estimator's first version, unless this device already has samples; empty = never.",
    )
    trace_replay: bool = Field(
        False,
        description="Benchmarks only: ignore EOS and stop every request at its max_new_tokens, which the "
        "benchmark sets to the recorded length (random-weight models never stop on their own).",
    )

    @model_validator(mode="after")
    def _check_continuous(self) -> WorkerSettings:
        if self.mode == "continuous" and (self.slowdown_factor != 1.0 or self.slowdown_step_s):
            raise ValueError("the slowdown test hooks wrap static batches; they do not apply in continuous mode")
        if self.backend == "paged":
            if self.mode != "continuous":
                raise ValueError("backend 'paged' serves continuous leases: set MAGNUS_WORKER_MODE=continuous")
            if self.paged_token_budget < self.paged_max_running:
                raise ValueError(f"paged_token_budget ({self.paged_token_budget}) must be >= paged_max_running "
                                 f"({self.paged_max_running}): every running request decodes in every step")
            return self
        if self.mode == "continuous" and self.backend == "hf":
            raise ValueError("continuous mode runs on the static backend (KV pool); backend 'hf' cannot")
        if self.mode == "continuous":
            self.backend = "static"  # "auto" would pick plain generate on a CPU
        return self

    @model_validator(mode="after")
    def _check_backoff(self) -> WorkerSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s ({self.backoff_initial_s})"
            )
        return self
