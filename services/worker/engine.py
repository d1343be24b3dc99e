"""Static batching on a transformers causal LM: one left-padded greedy `generate` per batch.

Rows that stop early (EOS or their own max_new_tokens) keep their slot until the whole batch
ends, as in the paper's static batching; that waste is what the batcher's WMA grouping avoids and
what `total_tokens - valid_tokens` measures.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from services.shared.tokenizer import load_tokenizer
from services.worker.fast_decoder import is_supported
from services.worker.model_builder import build_random_model, has_random_weights
from services.worker.preemption import Preemption, running_rows, stop_tensor
from services.worker.static_backend import KVCacheFull, StaticCacheBackend
from services.worker.token_stream import RowStream, TokenSink

log = logging.getLogger(__name__)

GIB = 1024**3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BatchOutOfMemory(Exception):
    """The device ran out of memory on this batch; memory was freed and the engine still serves."""


class BatchCancelled(Exception):
    """The batch was stopped on request (worker shutdown) before it finished."""


class BatchRejected(ValueError):
    """The batch cannot run on this model (e.g. too long for its context); retrying will not help."""


@dataclass(frozen=True)
class EngineItem:
    request_id: str
    prompt: str
    max_new_tokens: int
    is_streamed: bool = False  # its tokens go to the engine's token_sink as they are decoded
    predicted_tokens: int = 0  # the batcher's predicted output length, tokens (0 = none); the paged engine admits by it


@dataclass(frozen=True)
class ItemOutput:
    request_id: str
    text: str
    generated_tokens: int  # up to and including EOS, at most the request's max_new_tokens
    is_preempted: bool = False  # cut by a Preemption before its stop: the output so far


@dataclass(frozen=True)
class BatchOutput:
    items: list[ItemOutput]
    valid_tokens: int  # sum of generated_tokens
    total_tokens: int  # batch size x decode steps run, stopped rows included
    steps: int  # decode steps of the batch = longest row's generated_tokens
    run_s: float  # wall time, tokenizing through decoding, seconds


@dataclass(frozen=True)
class IdsOutput:
    generated_ids: list[list[int]]  # per row, cut at its stop (EOS kept)
    steps: int
    run_s: float


class _PerRowStop(StoppingCriteria):
    """Row i is done once it has max_new_tokens[i] new tokens; all rows are done on cancel, and on a
    preemption cut (the rows still running then come back unfinished)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: torch.Tensor, cancel: threading.Event | None,
                 preemption: Preemption | None, stops: torch.Tensor, row_stream: RowStream | None = None):
        self.row_stream = row_stream
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.cancel = cancel
        self.preemption = preemption
        self.stops = stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        steps = input_ids.shape[1] - self.prompt_tokens
        if self.row_stream is not None:  # called once per new token column, the first one included
            self.row_stream.push([[token] for token in input_ids[:, -1].tolist()])
        # counting running rows scans the output: only once the cut may be due
        may_cut = self.preemption is not None and steps >= self.preemption.after_steps
        if (self.cancel is not None and self.cancel.is_set()) or (
            may_cut
            and self.preemption.should_cut(steps, running_rows(input_ids[:, self.prompt_tokens:], self.max_new_tokens,
                                                               self.stops))
        ):
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return self.max_new_tokens <= steps


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def describe_device(device: torch.device) -> str:
    """"cpu", or the GPU's name (e.g. "NVIDIA H100 80GB HBM3"): what samples and logs are keyed by."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" is float32 on CPU (exact, and CPU half precision is slow) and bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Delta: K and V of every layer for one token, bytes = 2 x layers x kv_heads x head_dim x dtype."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * num_kv_heads * head_dim * dtype_bytes


class StaticBatchEngine:
    """One model on one device; `run` is blocking and must not be called concurrently."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cpu_kv_budget_bytes: int = 2 * GIB,
        cuda_reserve_bytes: int = 1 * GIB,
        simulate_oom_above_tokens: int = 0,
        backend: str = "auto",
        use_cuda_graphs: bool = True,
        attention: str = "auto",
        loaded: tuple[object, object] | None = None,
        trace_replay: bool = False,
        max_cuda_graphs: int = 256,
        graph_length_bucket_tokens: int = 32,
        batch_bucket_rows: int = 8,
    ) -> None:
        """Load the model and tokenizer from `model_dir`.

        loaded: an already built (model, tokenizer) to serve instead, for benchmarks that build a
        random-weight 7B shape in place; `model_dir` then only names it. A `model_dir` written by
        `model_builder.write_random_shape_folder` (config + tokenizer, no weights) gets seeded
        random weights built on the device.
        trace_replay: ignore EOS and stop every request exactly at its max_new_tokens (benchmarks
        replaying recorded lengths on random weights); never for serving.

        backend: "hf" (plain `generate`), "static" (preallocated KV pool, decode steps as CUDA
        graphs on GPUs; Llama-family models only) or "auto" (static on CUDA when supported).

        max_cuda_graphs: captured decode steps kept, one per (batch size, attention length bucket).
        graph_length_bucket_tokens: attention length is rounded up to a multiple of this: larger
        buckets mean fewer graphs to capture (each a stall while serving) but more masked KV reads.
        batch_bucket_rows: static backend: a batch runs padded to the next multiple of this many rows
        (powers of two below it) when the pool holds that: fewer graphs and compiled shapes; 1 = off.

        cpu_kv_budget_bytes: Theta announced on CPU, bytes. cuda_reserve_bytes: kept free on CUDA
        for activations and allocator slack, bytes. simulate_oom_above_tokens: test hook, raise
        BatchOutOfMemory when batch_size x (L + max new tokens) exceeds it; 0 = off.
        """
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.simulate_oom_above_tokens = simulate_oom_above_tokens
        self.trace_replay = trace_replay
        self.token_sink: TokenSink | None = None  # set by the worker to stream items' tokens as decoded
        started_s = time.monotonic()
        if loaded is None:
            self.tokenizer = load_tokenizer(self.model_dir)
            if has_random_weights(self.model_dir):
                config = AutoConfig.from_pretrained(self.model_dir)
                self.model = build_random_model(config, self.device, self.dtype)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        else:
            self.model, self.tokenizer = loaded
            self.model.eval()
        self.eos_token_ids = self._eos_token_ids()
        pad_token_id = self.tokenizer.pad_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else self.eos_token_ids[0]
        self.max_context_tokens = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.kv_bytes_per_token = kv_bytes_per_token(self.model.config, self.dtype)
        self.free_kv_bytes = self._free_kv_bytes(cpu_kv_budget_bytes, cuda_reserve_bytes)
        self.static: StaticCacheBackend | None = None
        if self._wants_static(backend):
            capacity_tokens = self.free_kv_bytes // self.kv_bytes_per_token
            self.static = StaticCacheBackend(
                self.model,
                capacity_tokens=capacity_tokens,
                use_cuda_graphs=use_cuda_graphs,
                attention=attention,
                compile_layers=use_cuda_graphs,  # the measured fastest on an H200 (reports/gpu/engine.md)
                max_graphs=max_cuda_graphs,
                length_bucket_tokens=graph_length_bucket_tokens,
                batch_bucket_rows=batch_bucket_rows,
            )
            self.free_kv_bytes = capacity_tokens * self.kv_bytes_per_token  # exactly what the pool holds
        self.backend_name = "static" if self.static else "hf"
        log.info(
            "loaded %s on %s (%s, %s backend) in %.1f s: Delta=%d bytes/token, Theta=%d bytes",
            self.model_dir, self.device_name, str(self.dtype).removeprefix("torch."), self.backend_name,
            time.monotonic() - started_s, self.kv_bytes_per_token, self.free_kv_bytes,
        )

    @property
    def device_name(self) -> str:
        return describe_device(self.device)

    def _eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{self.model_dir}: neither generation_config nor tokenizer names an EOS token")
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def _wants_static(self, backend: str) -> bool:
        if backend not in ("auto", "hf", "static"):
            raise ValueError(f"backend must be auto, hf or static, got {backend!r}")
        if backend == "hf":
            return False
        supported = is_supported(self.model.config)
        if backend == "static" and not supported:
            raise ValueError(f"{self.model_dir}: the static backend supports Llama-family models only")
        return supported and (backend == "static" or self.device.type == "cuda")

    def _free_kv_bytes(self, cpu_budget_bytes: int, cuda_reserve_bytes: int) -> int:
        if self.device.type != "cuda":
            return cpu_budget_bytes
        free_bytes, _total_bytes = torch.cuda.mem_get_info(self.device)
        return max(0, free_bytes - cuda_reserve_bytes)

    def warm_up(self, max_rows: int, max_attend_tokens: int = 0) -> None:
        """Compile and capture the static engine's batch buckets up to max_rows, each with its graphs up to
        max_attend_tokens, before serving (CUDA only: elsewhere nothing is compiled or captured; without
        buckets every batch size is its own shape, too many to warm)."""
        if self.static is None or not self.static.use_cuda_graphs or max_rows < 1 or self.static.batch_bucket_rows == 1:
            return
        started_s, captured_before = time.monotonic(), self.static.num_graph_captures
        warmed = self.static.warm_up(max_rows, max_attend_tokens=max_attend_tokens)
        log.info("warmed %d batch buckets (%s rows, %d graphs up to %d attended tokens) in %.1f s", len(warmed),
                 warmed[-1] if warmed else 0, self.static.num_graph_captures - captured_before, max_attend_tokens,
                 time.monotonic() - started_s)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt; special-token text counts as plain text (like tiktoken's encode_ordinary)."""
        encoded = self.tokenizer(list(prompts), add_special_tokens=False, split_special_tokens=True)
        return encoded["input_ids"]

    def run(
        self, items: Sequence[EngineItem], cancel: threading.Event | None = None, preemption: Preemption | None = None
    ) -> BatchOutput:
        """Run one static batch: greedy, stop per row at EOS or its max_new_tokens (or at a preemption cut)."""
        if not items:
            raise BatchRejected("empty batch")
        started_s = time.monotonic()
        prompt_ids = self.encode([item.prompt for item in items])
        stop_at_eos = not self.trace_replay
        limits = [item.max_new_tokens for item in items]
        row_stream = RowStream.maybe(self.token_sink, [i.request_id if i.is_streamed else None for i in items],
                                     limits, self.stop_ids(stop_at_eos))
        ids = self.run_ids(
            prompt_ids, limits, stop_at_eos=stop_at_eos, cancel=cancel, preemption=preemption, row_stream=row_stream,
        )
        texts = self.tokenizer.batch_decode(ids.generated_ids, skip_special_tokens=True)
        stops = self.stop_ids(stop_at_eos)
        outputs = [
            # a row that neither reached its limit nor ended at a stop token was cut
            ItemOutput(item.request_id, text, len(row), len(row) < item.max_new_tokens and row[-1] not in stops)
            for item, text, row in zip(items, texts, ids.generated_ids, strict=True)
        ]
        return BatchOutput(
            items=outputs,
            valid_tokens=sum(len(row) for row in ids.generated_ids),
            total_tokens=len(items) * ids.steps,
            steps=ids.steps,
            run_s=time.monotonic() - started_s,
        )

    def run_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        *,
        stop_at_eos: bool = True,
        cancel: threading.Event | None = None,
        preemption: Preemption | None = None,
        row_stream: RowStream | None = None,
    ) -> IdsOutput:
        """Generate for pre-tokenized prompts. stop_at_eos=False runs every row to its limit (calibration).
        row_stream: gets each row's tokens as they are decoded (every step on `generate`, every few on
        the static backend, where reading them costs a host sync)."""
        self._validate(prompt_ids, max_new_tokens)
        # An empty prompt gets EOS as its only token: a document boundary is what such a model saw
        # before text starts, and generate needs at least one position per row.
        rows = [list(row) if len(row) else [self.eos_token_ids[0]] for row in prompt_ids]
        prompt_tokens = max(len(row) for row in rows)
        self.raise_if_simulated_oom(len(rows), prompt_tokens, max(max_new_tokens))
        started_s = time.monotonic()
        try:
            output = self._generate(rows, prompt_tokens, max_new_tokens, stop_at_eos, cancel, preemption, row_stream)
        except KVCacheFull as error:
            raise BatchOutOfMemory(str(error)) from error
        except torch.OutOfMemoryError as error:
            self.free_memory()
            shape = f"{len(rows)} x {prompt_tokens} prompt tokens"
            raise BatchOutOfMemory(f"out of device memory on {shape}: {error}") from error
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            self.free_memory()
            raise BatchOutOfMemory(f"out of host memory on {len(rows)} x {prompt_tokens} prompt tokens") from error
        if cancel is not None and cancel.is_set():
            raise BatchCancelled("batch cancelled before it finished")
        generated = output[:, prompt_tokens:].tolist()
        stops = self.stop_ids(stop_at_eos)
        cut = [_cut_at_stop(row, limit, stops) for row, limit in zip(generated, max_new_tokens, strict=True)]
        return IdsOutput(generated_ids=cut, steps=len(generated[0]), run_s=time.monotonic() - started_s)

    def _validate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> None:
        if not prompt_ids:
            raise BatchRejected("empty batch")
        if len(prompt_ids) != len(max_new_tokens):
            raise BatchRejected(f"{len(prompt_ids)} prompts but {len(max_new_tokens)} max_new_tokens")
        if min(max_new_tokens) < 1:
            raise BatchRejected(f"max_new_tokens must be >= 1, got {min(max_new_tokens)}")
        longest = max(len(row) for row in prompt_ids) + max(max_new_tokens)
        if longest > self.max_context_tokens:
            raise BatchRejected(
                f"prompt + max_new_tokens = {longest} tokens exceeds the model's context of {self.max_context_tokens}"
            )

    def raise_if_simulated_oom(self, batch_size: int, prompt_tokens: int, max_new_tokens: int) -> None:
        """Test hook (MAGNUS_WORKER_SIMULATE_OOM_ABOVE_TOKENS): BatchOutOfMemory, as a device would raise it,
        for work of more slots than that; the batch loop and the continuous rows both ask before running."""
        slots_tokens = batch_size * (prompt_tokens + max_new_tokens)
        if 0 < self.simulate_oom_above_tokens < slots_tokens:
            raise BatchOutOfMemory(
                f"simulated OOM: {batch_size} x ({prompt_tokens} + {max_new_tokens}) = {slots_tokens} tokens "
                f"> {self.simulate_oom_above_tokens}"
            )

    def stop_ids(self, stop_at_eos: bool) -> set[int]:
        """Tokens that end a row: EOS, unless the row must run to its limit (trace replay, calibration)."""
        return set(self.eos_token_ids) if stop_at_eos else set()

    @torch.inference_mode()
    def _generate(self, rows, prompt_tokens, max_new_tokens, stop_at_eos, cancel, preemption=None,
                  row_stream: RowStream | None = None) -> torch.Tensor:
        stops = self.stop_ids(stop_at_eos)
        input_ids = torch.full((len(rows), prompt_tokens), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), prompt_tokens), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token is aligned
            input_ids[i, prompt_tokens - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, prompt_tokens - len(row):] = 1
        if self.static is not None:
            generated = self.static.generate(rows, self.pad_token_id, max_new_tokens, stops, cancel, preemption,
                                             on_tokens=row_stream.push if row_stream else None)
            return torch.cat([input_ids, generated], dim=1)
        limits = torch.tensor(list(max_new_tokens), dtype=torch.long, device=self.device)
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=int(limits.max()),
            eos_token_id=self.eos_token_ids if stop_at_eos else None,
            pad_token_id=self.pad_token_id,
        )
        return self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList(
                [_PerRowStop(prompt_tokens, limits, cancel, preemption, stop_tensor(stops, self.device), row_stream)]
            ),
        ).cpu()

    def free_memory(self) -> None:
        """After an out-of-memory error: drop the captured graphs and return cached blocks to the device."""
        if self.static is not None:
            self.static.drop_graphs()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A device OOM, or the CPU allocator's, which raises a plain RuntimeError."""
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _cut_at_stop(row: list[int], limit_tokens: int, stop_ids: set[int]) -> list[int]:
    """The row's own tokens: at most `limit_tokens`, ending at the first stop token (kept)."""
    row = row[:limit_tokens]
    for index, token in enumerate(row):
        if token in stop_ids:
            return row[: index + 1]
    return row
