"""Generation on a preallocated KV pool with decode steps replayed as CUDA graphs (CPU: eager).

The pool holds `capacity_tokens` tokens of K and V for every layer. A batch of B rows views it as
[B, kv_heads, capacity_tokens // B, head_dim] per layer, so MEM(B) = B (L + G) Delta fits exactly
when B (L + G) <= capacity_tokens: Theta = capacity_tokens x Delta is what the worker announces.
Graphs are captured lazily per (batch size, attention length rounded up to a bucket) and kept in
an LRU; per batch size the step's input buffers are persistent, so a graph serves every later
batch of that size. Continuous batching (services/worker/continuous.py) has its own "ragged" buffers
and graphs per batch size, whose rows write at their own cache positions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.worker.fast_decoder import DecodeState, LlamaFamilyDecoder
from services.worker.preemption import Preemption, running_rows, stop_tensor

log = logging.getLogger(__name__)

STOP_CHECK_EVERY_STEPS = 16  # host syncs to test "all rows stopped": rare enough to be free
PREFILL_CHUNK_TOKENS = 16_384  # bounds prefill activations: rows are prefilled in chunks


@dataclass
class _PrefillGraph:
    """One captured joiner prefill of fixed (rows, prompt tokens) and its static buffers."""

    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [J, P] long, left-padded prompts
    pad_tokens: torch.Tensor  # [J] long
    rows: torch.Tensor  # [J] long, the cache rows written
    first: torch.Tensor  # [J] long output: each prompt's next token


class KVCacheFull(Exception):
    """The batch needs more KV slots than the pool has: the static-cache form of out-of-memory."""


class StaticCacheBackend:
    def __init__(
        self,
        model,
        *,
        capacity_tokens: int,
        use_cuda_graphs: bool,
        attention: str = "sdpa",
        length_bucket_tokens: int = 32,
        max_graphs: int = 256,
        compile_layers: bool = False,
        batch_bucket_rows: int = 1,
    ) -> None:
        """batch_bucket_rows: a batch of B rows runs as the next multiple of this (powers of two below
        it), its extra rows padding that stop at once, whenever the pool holds the padded batch: one
        graph set and one compiled shape serve every batch size in a bucket. With buckets the layer
        pieces are compiled per shape (measured faster than shape-generic code on an H100,
        reports/gpu/engine.md); without, once for all shapes."""
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        if batch_bucket_rows < 1:
            raise ValueError(f"batch_bucket_rows must be >= 1, got {batch_bucket_rows}")
        self.decoder = LlamaFamilyDecoder(model)
        self.batch_bucket_rows = batch_bucket_rows
        if compile_layers and self.decoder.device.type == "cuda":
            self.decoder.compile_layer_pieces(dynamic=batch_bucket_rows == 1)
        self.capacity_tokens = capacity_tokens
        self.use_cuda_graphs = use_cuda_graphs and self.decoder.device.type == "cuda"
        self.attention = attention
        self.length_bucket_tokens = length_bucket_tokens
        self.max_graphs = max_graphs
        d = self.decoder
        elements = capacity_tokens * d.num_kv_heads * d.head_dim
        # zeros, not empty: masked positions get weight 0, and 0 x NaN from stale memory would be NaN
        self.k_pool = torch.zeros(d.num_layers, elements, dtype=d.dtype, device=d.device)
        self.v_pool = torch.zeros(d.num_layers, elements, dtype=d.dtype, device=d.device)
        self._states: dict[tuple[int, bool], DecodeState] = {}  # by (batch size, is_ragged)
        self._graphs: OrderedDict[tuple[int, int, bool], torch.cuda.CUDAGraph] = OrderedDict()
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self._prefill_graphs: OrderedDict[tuple[int, int], _PrefillGraph] = OrderedDict()  # by (J, P)
        # their own pool: prefill activations are larger than a step's and need not share its addresses
        self._prefill_graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self.num_graph_captures = 0
        self.graph_capture_s = 0.0  # wall time spent capturing (warm-up step included), seconds

    # ---- buffers ---------------------------------------------------------------------------
    def row_capacity_tokens(self, batch: int) -> int:
        return self.capacity_tokens // batch

    def padded_rows(self, batch: int, needed_tokens: int) -> int:
        """Rows to run a batch of `batch` as: its bucket if the pool holds that many rows of needed_tokens."""
        padded = bucket_rows(batch, self.batch_bucket_rows)
        return padded if needed_tokens <= self.row_capacity_tokens(padded) else batch

    def bucket_sizes(self, max_rows: int) -> list[int]:
        """Every bucket a batch of 1..max_rows rows can run as (warm-up compiles and captures these)."""
        return sorted({bucket_rows(b, self.batch_bucket_rows) for b in range(1, max_rows + 1)})

    def state_for(self, batch: int, is_ragged: bool = False) -> DecodeState:
        """The step buffers of `batch` rows; is_ragged: one write_index per row (continuous batching)."""
        state = self._states.get((batch, is_ragged))
        if state is None:
            d, row_capacity = self.decoder, self.row_capacity_tokens(batch)
            used = batch * d.num_kv_heads * row_capacity * d.head_dim
            shape = (batch, d.num_kv_heads, row_capacity, d.head_dim)
            state = DecodeState(
                tokens=torch.zeros(batch, dtype=torch.long, device=d.device),
                positions=torch.zeros(batch, dtype=torch.long, device=d.device),
                write_index=torch.zeros(batch if is_ragged else 1, dtype=torch.long, device=d.device),
                mask=torch.full((batch, 1, 1, row_capacity), float("-inf"), dtype=d.dtype, device=d.device),
                k_views=[self.k_pool[i, :used].view(shape) for i in range(d.num_layers)],
                v_views=[self.v_pool[i, :used].view(shape) for i in range(d.num_layers)],
                is_ragged=is_ragged,
            )
            self._states[(batch, is_ragged)] = state
        return state

    # ---- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        rows: Sequence[Sequence[int]],
        pad_token_id: int,
        max_new_tokens: Sequence[int],
        stop_ids: set[int],
        cancel: threading.Event | None = None,
        preemption: Preemption | None = None,
        on_tokens: Callable[[list[list[int]]], None] | None = None,
    ) -> torch.Tensor:
        """Greedy tokens [B, steps] (on the CPU); steps = until every row hit a stop or its limit, or
        until `preemption` cuts the few rows still running (checked every STOP_CHECK_EVERY_STEPS).
        on_tokens(per row, its tokens since the last call): at those checks (which sync with the host
        anyway) and at the end, for streaming."""
        batch, prompt_tokens, limit_steps = len(rows), max(len(r) for r in rows), max(max_new_tokens)
        needed_tokens = prompt_tokens + limit_steps
        if needed_tokens > self.row_capacity_tokens(batch):
            raise KVCacheFull(
                f"{batch} rows x {needed_tokens} tokens needs {batch * needed_tokens} KV slots; "
                f"the pool has {self.capacity_tokens}"
            )
        device = self.decoder.device
        tokens = torch.full((batch, prompt_tokens), pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, prompt_tokens - len(row):] = torch.tensor(list(row), dtype=torch.long)
        tokens = tokens.to(device)
        pad_tokens = torch.tensor([prompt_tokens - len(r) for r in rows], dtype=torch.long, device=device)

        # padding rows (batch buckets) are never prefilled: their prompt stays masked, they attend only
        # to what their own decode steps write (finite: the pool only ever holds finite values)
        padded = self.padded_rows(batch, needed_tokens)
        state = self.state_for(padded)
        state.tokens.fill_(pad_token_id)
        state.positions.zero_()
        state.tokens[:batch].copy_(self._prefill(tokens, pad_tokens, state))
        state.positions[:batch].copy_(prompt_tokens - pad_tokens)
        state.write_index.fill_(prompt_tokens)
        state.mask.fill_(float("-inf"))
        visible = torch.arange(prompt_tokens, device=device)[None, :] >= pad_tokens[:, None]
        state.mask[:batch, 0, 0, :prompt_tokens].masked_fill_(visible, 0.0)

        generated = torch.empty(batch, limit_steps, dtype=torch.long, device=device)
        generated[:, 0] = state.tokens[:batch]
        limits = torch.tensor(list(max_new_tokens), dtype=torch.long, device=device)
        stops = stop_tensor(stop_ids, device)
        steps, streamed_steps = 1, 0
        while steps < limit_steps:
            if steps % STOP_CHECK_EVERY_STEPS == 0:
                if on_tokens is not None:
                    on_tokens(generated[:, streamed_steps:steps].tolist())
                    streamed_steps = steps
                running = running_rows(generated[:, :steps], limits, stops)
                is_cut = preemption is not None and preemption.should_cut(steps, running)
                if running == 0 or is_cut or (cancel is not None and cancel.is_set()):
                    break
            self.decode_step(state, padded, prompt_tokens + steps)
            generated[:, steps] = state.tokens[:batch]
            steps += 1
        if on_tokens is not None and streamed_steps < steps:
            on_tokens(generated[:, streamed_steps:steps].tolist())
        return generated[:, :steps].cpu()

    @staticmethod
    def prefill_chunk_rows(prompt_tokens: int, batch: int) -> int:
        """Rows prefilled together: their activations (the workspace outside the pool) scale with this."""
        return min(batch, max(1, PREFILL_CHUNK_TOKENS // prompt_tokens))

    def _prefill(self, tokens: torch.Tensor, pad_tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        batch, prompt_tokens = tokens.shape
        chunk_rows = self.prefill_chunk_rows(prompt_tokens, batch)
        firsts = []
        for start in range(0, batch, chunk_rows):
            end = min(batch, start + chunk_rows)
            firsts.append(
                self.decoder.prefill(
                    tokens[start:end],
                    pad_tokens[start:end],
                    [k[start:end] for k in state.k_views],
                    [v[start:end] for v in state.v_views],
                )
            )
        return torch.cat(firsts)

    def decode_step(self, state: DecodeState, batch: int, attend_tokens: int) -> None:
        """One decode step of the first `batch` rows of `state`, attending `attend_tokens` cache positions
        (rounded up to the length bucket), replayed as a CUDA graph when graphs are on."""
        bucket = self.length_bucket_tokens
        attend_tokens = min(-(-attend_tokens // bucket) * bucket, state.mask.shape[-1])  # the state's row capacity
        if not self.use_cuda_graphs:
            self.decoder.decode_step(state, attend_tokens, self.attention)
            return
        self._graph_for(state, batch, attend_tokens).replay()

    def _graph_for(self, state: DecodeState, batch: int, attend_tokens: int) -> torch.cuda.CUDAGraph:
        key = (batch, attend_tokens, state.is_ragged)  # a graph replays the buffers it was captured on
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        started_s = time.perf_counter()
        # warm up once on a side stream (lazy library init must not happen during capture), then
        # restore the step's inputs, which the warm-up advanced
        saved = [t.clone() for t in (state.tokens, state.positions, state.write_index)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.decoder.decode_step(state, attend_tokens, self.attention)
        torch.cuda.current_stream().wait_stream(stream)
        for target, value in zip((state.tokens, state.positions, state.write_index), saved, strict=True):
            target.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self.decoder.decode_step(state, attend_tokens, self.attention)
        self._graphs[key] = graph
        self.num_graph_captures += 1
        self.graph_capture_s += time.perf_counter() - started_s
        if self.num_graph_captures % 100 == 0:  # a serving cost worth seeing: each capture stalls a batch
            log.info("captured %d decode graphs so far (%.1f s in all)", self.num_graph_captures, self.graph_capture_s)
        if len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    # ---- joiner prefills (continuous batching) ----------------------------------------------
    def prefill_rows(self, state: DecodeState, tokens: torch.Tensor, pad_tokens: torch.Tensor,
                     rows: torch.Tensor, use_graph: bool) -> torch.Tensor:
        """Prefill left-padded prompts [J, P] into cache rows `rows` of `state`; next ids [J] (valid
        until the next call). use_graph: replay the graph of (J, P), captured at warm-up (or here,
        once, after drop_graphs): callers pass it only for the few shapes warm-up captures. Eager
        otherwise and on the CPU."""
        if not (use_graph and self.use_cuda_graphs):
            return self.decoder.prefill(tokens, pad_tokens, state.k_views, state.v_views, rows=rows)
        key = tuple(tokens.shape)
        entry = self._prefill_graphs.get(key)
        if entry is None:
            entry = self._capture_prefill(state, tokens, pad_tokens, rows)
        else:
            self._prefill_graphs.move_to_end(key)
            entry.tokens.copy_(tokens)
            entry.pad_tokens.copy_(pad_tokens)
            entry.rows.copy_(rows)
        entry.graph.replay()
        return entry.first

    def _capture_prefill(self, state: DecodeState, tokens: torch.Tensor, pad_tokens: torch.Tensor,
                         rows: torch.Tensor) -> _PrefillGraph:
        """Capture a prefill on buffers holding these inputs: the warm-up run writes the very K/V the
        replay will, into the rows the caller owns, so rows in use elsewhere are never touched."""
        started_s = time.perf_counter()
        tokens, pad_tokens, rows = tokens.clone(), pad_tokens.clone(), rows.clone()
        decoder = self.decoder
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decoder.prefill(tokens, pad_tokens, state.k_views, state.v_views, rows=rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_graph_pool):
            first = decoder.prefill(tokens, pad_tokens, state.k_views, state.v_views, rows=rows)
        entry = _PrefillGraph(graph, tokens, pad_tokens, rows, first)
        self._prefill_graphs[tuple(tokens.shape)] = entry
        self.num_graph_captures += 1
        self.graph_capture_s += time.perf_counter() - started_s
        if len(self._prefill_graphs) > self.max_graphs:
            self._prefill_graphs.popitem(last=False)
        return entry

    @torch.inference_mode()
    def capture_prefill_shapes(self, state: DecodeState, shapes: Sequence[tuple[int, int]]) -> int:
        """Before serving (every row of `state` free): capture the joiner prefill of each (rows, prompt
        tokens) in `shapes`, writing rows 0.. of `state` (repeated where there are more than it has).
        Returns the number captured."""
        if not self.use_cuda_graphs:
            return 0
        before, device, slots = self.num_graph_captures, self.decoder.device, state.tokens.shape[0]
        for joiners, prompt_tokens in shapes:
            if (joiners, prompt_tokens) in self._prefill_graphs:
                continue
            tokens = torch.ones(joiners, prompt_tokens, dtype=torch.long, device=device)
            zeros = torch.zeros(joiners, dtype=torch.long, device=device)
            self._capture_prefill(state, tokens, zeros, torch.arange(joiners, device=device) % slots)
        return self.num_graph_captures - before

    def warm_up(self, max_rows: int, prompt_tokens: int = 16, new_tokens: int = 2, on_bucket=None,
                max_attend_tokens: int = 0) -> list[int]:
        """Run a short batch at every bucket up to max_rows rows that the pool holds, so that compiling
        the layer pieces for its shape and capturing its graphs up to max_attend_tokens happen now, not
        on a served batch (seconds per bucket on a GPU). on_bucket(rows, seconds) after each. Returns
        the buckets run."""
        warmed = []
        for rows in self.bucket_sizes(max_rows):
            if rows * (prompt_tokens + new_tokens) > self.capacity_tokens:
                break
            started_s = time.perf_counter()
            self.generate([[1] * prompt_tokens] * rows, 0, [new_tokens] * rows, set())
            self.capture_attention_buckets(self.state_for(rows), rows, max_attend_tokens)
            if on_bucket is not None:
                on_bucket(rows, time.perf_counter() - started_s)
            warmed.append(rows)
        return warmed

    @torch.inference_mode()
    def capture_attention_buckets(self, state: DecodeState, batch: int, max_attend_tokens: int) -> int:
        """Capture the step graphs of `batch` rows on `state` at every attention-length bucket up to
        max_attend_tokens (a capture stalls the batch that first needs it, and the first policy measured
        would pay for all of them). Returns the graphs captured; 0 without CUDA graphs."""
        if not self.use_cuda_graphs:
            return 0
        before = self.num_graph_captures
        top_tokens = min(max_attend_tokens, state.mask.shape[-1])  # the state's row capacity
        for attend_tokens in range(self.length_bucket_tokens, top_tokens + 1, self.length_bucket_tokens):
            self._graph_for(state, batch, attend_tokens)
        return self.num_graph_captures - before

    def drop_graphs(self) -> None:
        """Forget captured graphs and step buffers (after an OOM, whose state is unknown)."""
        if self.use_cuda_graphs:
            torch.cuda.synchronize()
        self._graphs.clear()
        self._prefill_graphs.clear()
        self._states.clear()
        if self.use_cuda_graphs:  # a pool whose graphs were freed must not be captured into again
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._prefill_graph_pool = torch.cuda.graph_pool_handle()


def bucket_rows(batch: int, granularity: int) -> int:
    """The batch bucket of `batch` rows: powers of two up to `granularity`, then multiples of it, and of
    an eighth of the next power of two once that is larger (at most 25 % padding rows, ~23 buckets to
    512 rows for granularity 8)."""
    if batch <= granularity:
        return min(granularity, 1 << (batch - 1).bit_length())
    step = max(granularity, (1 << (batch - 1).bit_length()) // 8)
    return -(-batch // step) * step
