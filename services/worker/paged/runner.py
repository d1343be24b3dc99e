"""The paged engine's ModelRunner: a step plan in, greedy tokens of each sampled chunk out (issue 23).

Public verbs, as nano-vllm's ModelRunner: `prepare(plan)` turns a scheduler's plan into device
inputs, `step(prepared)` runs the model and samples, `free()` releases the device memory. It sees
chunks (token ids, positions, block tables), never requests, queues or the pool's bookkeeping.

A plan of decode rows only runs `PagedDecoder.decode`, on a GPU replayed as a CUDA graph captured
once per row bucket (block tables padded to a fixed width, so one graph serves every length); a
plan with prefill chunks runs `mixed_step.mixed_forward`, on a GPU replayed as a CUDA graph captured
once per token bucket (`mixed_step.GraphedMixed`). Host-side, a step's integer inputs are packed into
one buffer and sent in one copy (`decode_step.upload`); the only sync is reading the sampled tokens.
A chunk with drafts (speculation.py) is sampled after each of its last num_drafts + 1 tokens: its
request gets a tuple of that many tokens, the others one int.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from services.worker.paged.decode_step import (
    GraphedDecode, PagedDecoder, PagedModelConfig, PagedWeights, StepInputs, upload,
)
from services.worker.paged.kv_blocks import padded_tables
from services.worker.paged.mixed_step import GraphedMixed, MixedInputs, MixedLayout, mixed_forward
from services.worker.paged.request import PENDING_TOKEN, StepPlan

# up to 256 rows: decode steps; above: steps whose short prefills run as rows (`prepare`)
DEFAULT_GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# token buckets of the captured mixed steps (decode rows + prefill chunks): a step runs in the smallest
# that holds it, its padding tokens computed and dropped, which costs GEMM time (a 1,312-token step in a
# 1,536 bucket ran 38.3 ms captured against 32.4 ms of kernels eagerly, reports/gpu/mixed_step run 1):
# hence a bucket every 128 tokens (17 graphs; with the decode ones captured at start-up in 4-8 s on an H200)
DEFAULT_MIXED_GRAPH_TOKENS = (64, *range(128, 2048 + 1, 128))
# A step whose prefill tokens attend at most this many positions in all (the sum over tokens) runs
# each token as a decode row: see `ModelRunner.prepare`. ~8 MiB of K/V a layer for the 7B shape.
DEFAULT_ROWS_ATTENDED_LIMIT = 16_384


@dataclass
class PreparedStep:
    """A plan's device inputs; `sampled_ids` name the rows of the logits the step returns."""

    sampled_ids: list[Hashable]
    sample_counts: list[int] | None = None  # tokens sampled per sampled_ids entry, where drafts make any > 1
    decode: StepInputs | None = None  # decode rows only, eager
    graphed: GraphedDecode | None = None  # decode rows only, inputs filled into this graph's buffers
    mixed: MixedInputs | None = None  # prefill chunks, eager
    mixed_graph: GraphedMixed | None = None  # prefill chunks, inputs copied into this graph's buffer
    num_rows: int = 0
    sample_rows: torch.Tensor | None = None  # decode paths: rows whose next token is sampled (None: all)
    num_samples: int = 0  # captured mixed step: the sampled tokens among its graph's outputs


@dataclass
class LaunchedStep:
    """A step launched and not yet read (`ModelRunner.launch`): its sampled tokens on the device, in
    `sampled_ids` order, and on their way to the host."""

    sampled_ids: list[Hashable]
    sample_counts: list[int] | None  # as PreparedStep's
    tokens: torch.Tensor  # [R] int64 on the device, a copy no later replay overwrites
    host_tokens: torch.Tensor  # [R] int64 on the host, filled once `ready` has passed
    ready: torch.cuda.Event | None  # recorded after the copy to the host (None on the CPU)

    @property
    def row_of(self) -> dict[Hashable, int]:
        """Row of `tokens` holding each request's last sampled token."""
        if self.sample_counts is None:
            return {request_id: row for row, request_id in enumerate(self.sampled_ids)}
        ends = np.cumsum(self.sample_counts) - 1
        return dict(zip(self.sampled_ids, ends.tolist(), strict=True))


def by_request(sampled_ids: list[Hashable], sample_counts: list[int] | None,
               tokens: list[int]) -> dict[Hashable, int | tuple[int, ...]]:
    """A step's sampled tokens by request: one int each, a tuple for a chunk sampled several times."""
    if sample_counts is None:
        return dict(zip(sampled_ids, tokens, strict=True))
    result, at = {}, 0
    for request_id, count in zip(sampled_ids, sample_counts, strict=True):
        result[request_id] = tokens[at] if count == 1 else tuple(tokens[at:at + count])
        at += count
    if at != len(tokens):
        raise RuntimeError(f"a step sampled {len(tokens)} tokens for {at} sample positions")
    return result


class ModelRunner:
    """Runs steps of a Llama-family model over a paged KV cache of `num_blocks` x `block_tokens`."""

    def __init__(self, decoder: PagedDecoder, *, use_cuda_graphs: bool = False,
                 graph_rows: Sequence[int] = DEFAULT_GRAPH_ROWS, max_model_tokens: int | None = None,
                 rows_attended_limit: int = DEFAULT_ROWS_ATTENDED_LIMIT,
                 mixed_graph_tokens: Sequence[int] = DEFAULT_MIXED_GRAPH_TOKENS, max_graph_chunks: int = 512) -> None:
        """mixed_graph_tokens: the token buckets of captured mixed steps (empty: mixed steps run
        eagerly); max_graph_chunks: chunks a captured mixed step holds at most (the scheduler's
        max_running): each sampled row of the bucket computes its logits, so more costs LM-head time."""
        self.decoder = decoder
        self.device = decoder.device
        self.block_tokens = decoder.block_tokens
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graph_rows = sorted(graph_rows)
        max_model_tokens = max_model_tokens or decoder.config.max_positions
        self.graph_table_width = -(-max_model_tokens // self.block_tokens)
        self.rows_attended_limit = rows_attended_limit
        self._graphs: dict[int, GraphedDecode] = {}
        self.mixed_graph_tokens = sorted(mixed_graph_tokens)
        self.max_graph_chunks = max_graph_chunks
        self._mixed_graphs: dict[int, GraphedMixed] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self.num_graph_captures = 0  # decode and mixed
        self.num_mixed_graph_captures = 0

    @classmethod
    def from_hf(cls, model, num_blocks: int, block_tokens: int = 16, **options) -> ModelRunner:
        """Over copies of a transformers Llama-family model's weights (q/k/v and gate/up fused)."""
        decoder_options = {k: options.pop(k) for k in ("use_triton", "kv_layout", "attention_launch", "varlen_launch")
                           if k in options}
        decoder = PagedDecoder(PagedModelConfig.from_hf(model.config), PagedWeights.from_hf(model), num_blocks,
                               block_tokens, **decoder_options)
        return cls(decoder, **options)

    @property
    def num_blocks(self) -> int:
        return self.decoder.num_blocks

    # ---- prepare -------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan, previous: LaunchedStep | None = None) -> PreparedStep:
        """The plan's inputs on the device; no model work. A decode row whose token is PENDING_TOKEN
        (sampled by the step still running, see `Scheduler.commit`) takes it from `previous`'s tokens
        on the device, so this can run while that step does: then every copy is asynchronous."""
        chunks, block_tokens = plan.chunks, self.block_tokens
        num_chunks = len(chunks)
        sampled_ids = [c.request_id for c in chunks if c.is_sampled]
        tables = [c.block_table for c in chunks]
        # per chunk, then per token through numpy: a step holds hundreds of rows and a prefill
        # chunk up to the token budget, and the GPU waits on this
        chunk_tokens = np.fromiter(map(len, (c.token_ids for c in chunks)), np.int64, num_chunks)
        start_positions = np.fromiter((c.start_position for c in chunks), np.int64, num_chunks)
        is_sampled = np.fromiter((c.is_sampled for c in chunks), bool, num_chunks)
        query_starts = np.zeros(num_chunks + 1, np.int64)
        np.cumsum(chunk_tokens, out=query_starts[1:])
        num_tokens = int(query_starts[-1])
        if plan.is_decode_only:
            token_ids = np.fromiter((c.token_ids[0] for c in chunks), np.int64, num_chunks)
            token_chunks, positions = np.arange(num_chunks), start_positions
        else:
            token_ids = np.fromiter(chain.from_iterable(c.token_ids for c in chunks), np.int64, num_tokens)
            token_chunks = np.repeat(np.arange(num_chunks), chunk_tokens)
            positions = np.arange(num_tokens) + np.repeat(start_positions - query_starts[:-1], chunk_tokens)
        pending = np.flatnonzero(token_ids == PENDING_TOKEN)  # their rows: a decode chunk's one token
        if len(pending):
            if previous is None:
                raise RuntimeError("a step plan feeds pending tokens but no launched step samples them")
            row_of = previous.row_of
            pending_from = [row_of[chunks[chunk].request_id] for chunk in token_chunks[pending]]
            token_ids[pending] = 0  # in the vocabulary until the device copy replaces it
        taking = (pending, pending_from) if len(pending) else None
        pin = previous is not None  # the previous step may still run: no copy may wait for it
        # padded with -1: a position past its request's table gets a negative slot, which _check_slots refuses
        table_rows = padded_tables(tables, max(map(len, tables)), -1)
        slots = table_rows[token_chunks, positions // block_tokens] * block_tokens + positions % block_tokens
        self._check_slots(slots)
        sample_counts = None
        if plan.num_draft_tokens:  # a chunk with drafts is sampled at its last num_drafts + 1 tokens
            counts = 1 + np.fromiter((c.num_drafts for c in chunks), np.int64, num_chunks)[is_sampled]
            firsts = query_starts[1:][is_sampled] - counts
            offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            sample_indices = np.repeat(firsts, counts) + offsets
            sample_counts = counts.tolist()
        else:
            sample_indices = query_starts[1:][is_sampled] - 1
        if plan.is_decode_only or self._fits_rows(chunk_tokens, start_positions, num_tokens):
            # Every token a row of the decode step: a prefill token at position p attends positions
            # 0..p through the same paged kernel, after the step wrote the K/V of all its rows, which
            # is causal attention. So a step with a few short prefills (a joiner at low load) replays
            # the decode step's CUDA graph instead of the mixed step (~4x longer on an H200 when the
            # mixed step ran eagerly: reports/gpu/serving). Logits of unsampled rows are computed and dropped.
            row_tables = table_rows.clip(min=0)[token_chunks].astype(np.int32)  # padded with block 0
            prepared = self._prepare_decode(sampled_ids, token_ids, positions, slots, row_tables, sample_indices, pin)
            prepared.sample_counts = sample_counts
            inputs = prepared.graphed.inputs if prepared.graphed is not None else prepared.decode
            self._take_pending(inputs.token_ids, taking, previous, pin)
            return prepared
        context_lens = start_positions + chunk_tokens
        width = table_rows.shape[1]
        graphed = self._mixed_graph_for(num_tokens, max(num_chunks, len(sample_indices)), width)
        layout = graphed.layout if graphed is not None else MixedLayout(num_tokens, num_chunks, len(sample_indices),
                                                                       width)
        flat = torch.from_numpy(layout.pack(token_ids, positions, slots, query_starts, context_lens, tables,
                                            sample_indices, scratch_slot=self.decoder.scratch_slot,
                                            scratch_block=self.decoder.num_blocks))
        if graphed is not None:
            graphed.buffer.copy_(upload(flat, self.device, pin))  # into the graph's input buffer
            self._take_pending(graphed.inputs.token_ids, taking, previous, pin)
            return PreparedStep(sampled_ids, sample_counts, mixed_graph=graphed, num_rows=num_chunks,
                                num_samples=len(sample_indices))
        inputs = layout.views(upload(flat, self.device, pin))
        self._take_pending(inputs.token_ids, taking, previous, pin)
        return PreparedStep(sampled_ids, sample_counts, mixed=inputs, num_rows=num_chunks)

    def _take_pending(self, token_ids: torch.Tensor, taking, previous: LaunchedStep | None, pin: bool) -> None:
        """token_ids[rows] = previous.tokens[sources] on the device, for taking = (rows, sources)."""
        if taking is None:
            return
        rows, sources = taking
        both = upload(torch.from_numpy(np.concatenate((rows, np.asarray(sources, np.int64)))), self.device, pin)
        token_ids.index_copy_(0, both[:len(rows)], previous.tokens.index_select(0, both[len(rows):]))

    def _mixed_graph_for(self, num_tokens: int, num_chunks: int, table_width: int) -> GraphedMixed | None:
        """The captured mixed step of the smallest token bucket that holds this step (None: run it eagerly);
        num_chunks: its chunks or its sampled tokens, whichever are more (a graph holds as many of each)."""
        if not self.use_cuda_graphs or table_width > self.graph_table_width:
            return None
        bucket = next((size for size in self.mixed_graph_tokens if size >= num_tokens), None)
        if bucket is None or num_chunks > self._graph_chunks(bucket):
            return None
        return self._mixed_graph(bucket)

    def _fits_rows(self, chunk_tokens: np.ndarray, start_positions: np.ndarray, num_tokens: int) -> bool:
        """The step can run as decode rows: no more rows than the largest graph bucket, and its prefill
        tokens attend few positions (each row reads its whole prefix)."""
        if num_tokens > self.graph_rows[-1]:
            return False
        # a chunk of n tokens from position s attends s + 1 .. s + n positions, token by token
        attended = chunk_tokens * (2 * start_positions + 1 + chunk_tokens) // 2
        return int(attended.sum(where=chunk_tokens > 1)) <= self.rows_attended_limit

    def _check_slots(self, slots: np.ndarray) -> None:
        """A plan's slots within the cache: a scheduler bug fails here, by name, not as a device assert."""
        if len(slots) and not 0 <= slots.min() <= slots.max() < self.decoder.num_blocks * self.block_tokens:
            raise RuntimeError(f"step plan writes slots {slots.min()}..{slots.max()} outside the cache of "
                               f"{self.decoder.num_blocks * self.block_tokens}")

    def _prepare_decode(self, sampled_ids: list[Hashable], token_ids: np.ndarray, positions: np.ndarray,
                        slots: np.ndarray, tables: np.ndarray, sample_rows: np.ndarray, pin: bool) -> PreparedStep:
        """tables: [rows, width] int32, each row's blocks padded; sample_rows: increasing row indices."""
        rows, width = tables.shape
        # increasing and distinct, so as many as the rows means every row
        sample = None if len(sample_rows) == rows else upload(torch.from_numpy(sample_rows), self.device, pin)
        table = torch.from_numpy(tables)
        bucket = next((size for size in self.graph_rows if size >= rows), None)
        if self.use_cuda_graphs and bucket is not None and width <= self.graph_table_width:
            graphed = self._graph(bucket)
            self.decoder.fill(graphed.inputs, token_ids, positions, slots, table, pin=pin)
            return PreparedStep(sampled_ids, graphed=graphed, num_rows=rows, sample_rows=sample)
        inputs = self.decoder.empty_inputs(rows, width)
        self.decoder.fill(inputs, token_ids, positions, slots, table, pin=pin)
        return PreparedStep(sampled_ids, decode=inputs, num_rows=rows, sample_rows=sample)

    # ---- step ----------------------------------------------------------------------------------
    def step(self, prepared: PreparedStep) -> dict[Hashable, int]:
        """Run the step; returns the greedy next token of every sampled chunk's request (one sync)."""
        return by_request(prepared.sampled_ids, prepared.sample_counts, self._run(prepared).tolist())

    def launch(self, prepared: PreparedStep) -> LaunchedStep:
        """Run the step without waiting for it: its tokens come back from `collect`, and the next
        step can be prepared meanwhile (`prepare(plan, previous=...)`)."""
        tokens = self._run(prepared).clone()  # outside inference mode: a plain tensor later steps may read
        if self.device.type != "cuda":
            return LaunchedStep(prepared.sampled_ids, prepared.sample_counts, tokens, tokens, None)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(prepared.sampled_ids, prepared.sample_counts, tokens, host_tokens, ready)

    def collect(self, launched: LaunchedStep) -> dict[Hashable, int]:
        """The launched step's tokens by request id (waits for that step only, not for later ones)."""
        if launched.ready is not None:
            launched.ready.synchronize()
        return by_request(launched.sampled_ids, launched.sample_counts, launched.host_tokens.tolist())

    @torch.inference_mode()
    def _run(self, prepared: PreparedStep) -> torch.Tensor:
        """Launch the step's work; its greedy tokens [R] on the device, in sampled_ids order."""
        if prepared.mixed_graph is not None:
            prepared.mixed_graph.replay()
            return prepared.mixed_graph.next_tokens[:prepared.num_samples]
        if prepared.mixed is not None:
            return mixed_forward(self.decoder, prepared.mixed).argmax(dim=-1)
        if prepared.graphed is not None:
            prepared.graphed.replay()
            tokens = prepared.graphed.next_tokens[:prepared.num_rows]
        else:
            tokens = self.decoder.decode(prepared.decode).argmax(dim=-1)
        return tokens if prepared.sample_rows is None else tokens[prepared.sample_rows]

    def warm_up(self, max_rows: int, max_tokens: int = 0) -> int:
        """CUDA graphs: capture the decode step of every row bucket up to `max_rows` and the mixed
        step of every token bucket up to `max_tokens` (the scheduler's token budget) now, so no
        served step waits for a capture. Returns the number captured."""
        if not self.use_cuda_graphs:
            return 0
        before = self.num_graph_captures
        for rows in self.graph_rows:
            if rows <= max(max_rows, self.graph_rows[0]):
                self._graph(rows)
        for tokens in self.mixed_graph_tokens:
            if max_tokens and tokens <= max(max_tokens, self.mixed_graph_tokens[0]):
                self._mixed_graph(tokens)
        return self.num_graph_captures - before

    def _graph(self, rows: int) -> GraphedDecode:
        if rows not in self._graphs:
            with torch.no_grad():  # not inference_mode: prepare() refills the graph's inputs in place, outside it
                self._graphs[rows] = GraphedDecode(self.decoder, rows, self.graph_table_width, pool=self._graph_pool)
            self.num_graph_captures += 1
        return self._graphs[rows]

    def _graph_chunks(self, tokens: int) -> int:
        return min(tokens, self.max_graph_chunks)

    def _mixed_graph(self, tokens: int) -> GraphedMixed:
        if tokens not in self._mixed_graphs:
            with torch.no_grad():
                self._mixed_graphs[tokens] = GraphedMixed(self.decoder, tokens, self._graph_chunks(tokens),
                                                          self.graph_table_width, pool=self._graph_pool)
            self.num_graph_captures += 1
            self.num_mixed_graph_captures += 1
        return self._mixed_graphs[tokens]

    # ---- free ----------------------------------------------------------------------------------
    def free(self) -> None:
        """Release the graphs and the KV cache; the runner cannot step afterwards."""
        self._graphs.clear()
        self._mixed_graphs.clear()
        self.decoder.k_caches.clear()
        self.decoder.v_caches.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
