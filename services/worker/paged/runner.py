"""The paged engine's ModelRunner: a step plan in, one greedy token per sampled chunk out (issue 23).

Public verbs, as nano-vllm's ModelRunner: `prepare(plan)` turns a scheduler's plan into device
inputs, `step(prepared)` runs the model and samples, `free()` releases the device memory. It sees
chunks (token ids, positions, block tables), never requests, queues or the pool's bookkeeping.

A plan of decode rows only runs `PagedDecoder.decode`, on a GPU replayed as a CUDA graph captured
once per row bucket (block tables padded to a fixed width, so one graph serves every length); a
plan with prefill chunks runs `mixed_step.mixed_forward` eagerly, all its chunks of more than one
token attended in one padded call (`mixed_step.PrefillBatch`). Host-side, a step's integer
inputs are packed into one pinned staging buffer and sent in one asynchronous copy; the only sync
is reading the sampled tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from services.worker.paged.decode_step import GraphedDecode, PagedDecoder, PagedModelConfig, PagedWeights, StepInputs
from services.worker.paged.mixed_step import MixedInputs, PrefillBatch, mixed_forward
from services.worker.paged.scheduler import ScheduledChunk, StepPlan

# up to 256 rows: decode steps; above: steps whose short prefills run as rows (`prepare`)
DEFAULT_GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# A step whose prefill tokens attend at most this many positions in all (the sum over tokens) runs
# each token as a decode row: see `ModelRunner.prepare`. ~8 MiB of K/V a layer for the 7B shape.
DEFAULT_ROWS_ATTENDED_LIMIT = 16_384


@dataclass
class PreparedStep:
    """A plan's device inputs; `sampled_ids` name the rows of the logits the step returns."""

    sampled_ids: list[Hashable]
    decode: StepInputs | None = None  # decode rows only, eager
    graphed: GraphedDecode | None = None  # decode rows only, inputs filled into this graph's buffers
    mixed: MixedInputs | None = None
    num_rows: int = 0
    sample_rows: torch.Tensor | None = None  # decode paths: rows whose next token is sampled (None: all)


class ModelRunner:
    """Runs steps of a Llama-family model over a paged KV cache of `num_blocks` x `block_tokens`."""

    def __init__(self, decoder: PagedDecoder, *, use_cuda_graphs: bool = False,
                 graph_rows: Sequence[int] = DEFAULT_GRAPH_ROWS, max_model_tokens: int | None = None,
                 rows_attended_limit: int = DEFAULT_ROWS_ATTENDED_LIMIT) -> None:
        self.decoder = decoder
        self.device = decoder.device
        self.block_tokens = decoder.block_tokens
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graph_rows = sorted(graph_rows)
        max_model_tokens = max_model_tokens or decoder.config.max_positions
        self.graph_table_width = -(-max_model_tokens // self.block_tokens)
        self.rows_attended_limit = rows_attended_limit
        self._graphs: dict[int, GraphedDecode] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        self.num_graph_captures = 0

    @classmethod
    def from_hf(cls, model, num_blocks: int, block_tokens: int = 16, **options) -> ModelRunner:
        """Over copies of a transformers Llama-family model's weights (q/k/v and gate/up fused)."""
        decoder_options = {k: options.pop(k) for k in ("use_triton", "kv_layout", "attention_launch") if k in options}
        decoder = PagedDecoder(PagedModelConfig.from_hf(model.config), PagedWeights.from_hf(model), num_blocks,
                               block_tokens, **decoder_options)
        return cls(decoder, **options)

    @property
    def num_blocks(self) -> int:
        return self.decoder.num_blocks

    # ---- prepare -------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> PreparedStep:
        """The plan's inputs on the device (asynchronously copied); no model work."""
        chunks, block_tokens = plan.chunks, self.block_tokens
        sampled_ids = [c.request_id for c in chunks if c.is_sampled]
        token_ids, positions, slots, query_starts = [], [], [], [0]
        for chunk in chunks:
            token_ids += chunk.token_ids
            span = range(chunk.start_position, chunk.context_tokens)
            positions += span
            slots += [chunk.block_table[p // block_tokens] * block_tokens + p % block_tokens for p in span]
            query_starts.append(len(token_ids))
        self._check_slots(slots)
        if plan.is_decode_only or self._fits_rows(chunks, len(token_ids)):
            # Every token a row of the decode step: a prefill token at position p attends positions
            # 0..p through the same paged kernel, after the step wrote the K/V of all its rows, which
            # is causal attention. So a step with a few short prefills (a joiner at low load) replays
            # the decode step's CUDA graph instead of running the eager mixed step, ~4x longer on an
            # H200 (reports/gpu/serving). Logits of unsampled rows are computed and dropped.
            row_tables = [c.block_table for c in chunks for _ in c.token_ids]
            sample_rows = [query_starts[i + 1] - 1 for i, c in enumerate(chunks) if c.is_sampled]
            return self._prepare_decode(sampled_ids, token_ids, positions, slots, row_tables, sample_rows)
        tables = [c.block_table for c in chunks]
        is_decode = [len(c.token_ids) == 1 for c in chunks]
        decode_chunks = [i for i, flag in enumerate(is_decode) if flag]
        sample_indices = [query_starts[i + 1] - 1 for i, c in enumerate(chunks) if c.is_sampled]
        width = max(len(t) for t in tables)
        flat_tables = [b for t in tables for b in (*t, *(0,) * (width - len(t)))]
        token_ids, positions, slots, flat_tables, context_lens, sample_indices, decode_chunks, decode_tokens = (
            self._to_device(token_ids, positions, slots, flat_tables, [c.context_tokens for c in chunks],
                            sample_indices, decode_chunks, [query_starts[i] for i in decode_chunks]))
        block_tables, context_lens = flat_tables.to(torch.int32).view(len(chunks), width), context_lens.to(torch.int32)
        mixed = MixedInputs(
            token_ids=token_ids, positions=positions, slot_mapping=slots, block_tables=block_tables,
            context_lens=context_lens, sample_indices=sample_indices, query_starts=query_starts,
            decode_chunks=decode_chunks, decode_token_indices=decode_tokens,
            decode_block_tables=block_tables[decode_chunks], decode_context_lens=context_lens[decode_chunks],
            prefill=self._prefill_batch([(c, query_starts[i]) for i, c in enumerate(chunks) if not is_decode[i]])
            if not all(is_decode) else None,
        )
        return PreparedStep(sampled_ids, mixed=mixed, num_rows=len(chunks))

    def _prefill_batch(self, chunks: list[tuple[ScheduledChunk, int]]) -> PrefillBatch:
        """The chunks of > 1 token (with the flat index of their first token), padded for one attention call."""
        block_tokens, scratch = self.block_tokens, self.decoder.num_blocks
        num_queries = max(len(c.token_ids) for c, _ in chunks)
        # positions padded to a multiple of 16: the memory-efficient attention kernel wants its
        # mask's rows aligned so (else it copies the mask each call), and fewer shapes recur
        num_positions = -(-max(c.context_tokens for c, _ in chunks) // 16) * 16
        token_index, blocks, offsets, valid_rows, valid_tokens, starts, lengths = [], [], [], [], [], [], []
        for p, (chunk, first) in enumerate(chunks):
            n, context = len(chunk.token_ids), chunk.context_tokens
            token_index += [*range(first, first + n), *(0,) * (num_queries - n)]
            blocks += [chunk.block_table[j // block_tokens] for j in range(context)]
            blocks += [scratch] * (num_positions - context)
            offsets += [j % block_tokens for j in range(context)] + [0] * (num_positions - context)
            valid_rows += range(p * num_queries, p * num_queries + n)
            valid_tokens += range(first, first + n)
            starts.append(chunk.start_position)
            lengths.append(n)
        token_index, blocks, offsets, valid_rows, valid_tokens, starts, lengths = self._to_device(
            token_index, blocks, offsets, valid_rows, valid_tokens, starts, lengths)
        query = torch.arange(num_queries, device=self.device)[None, :, None]
        position = torch.arange(num_positions, device=self.device)[None, None, :]
        is_query = query < lengths[:, None, None]
        mask = ((position <= starts[:, None, None] + query) & is_query) | (~is_query & (position == 0))
        shape = (len(chunks), -1)
        group = self.decoder.config.num_heads // self.decoder.config.num_kv_heads
        mask = mask[:, None] if group == 1 else mask[:, None].repeat(1, 1, group, 1)  # see PrefillBatch.mask
        return PrefillBatch(token_index.view(shape), blocks.view(shape), offsets.view(shape), mask,
                            valid_rows, valid_tokens)

    def _fits_rows(self, chunks: Sequence[ScheduledChunk], num_tokens: int) -> bool:
        """The step can run as decode rows: no more rows than the largest graph bucket, and its prefill
        tokens attend few positions (each row reads its whole prefix)."""
        if num_tokens > self.graph_rows[-1]:
            return False
        attended = sum(len(c.token_ids) * (c.start_position + 1 + c.context_tokens) // 2
                       for c in chunks if len(c.token_ids) > 1)
        return attended <= self.rows_attended_limit

    def _check_slots(self, slots: Sequence[int]) -> None:
        """A plan's slots within the cache: a scheduler bug fails here, by name, not as a device assert."""
        if slots and not 0 <= min(slots) <= max(slots) < self.decoder.num_blocks * self.block_tokens:
            raise RuntimeError(f"step plan writes slots {min(slots)}..{max(slots)} outside the cache of "
                               f"{self.decoder.num_blocks * self.block_tokens}")

    def _prepare_decode(self, sampled_ids, token_ids, positions, slots, tables, sample_rows) -> PreparedStep:
        rows = len(token_ids)
        sample = None if sample_rows == list(range(rows)) else self._to_device(sample_rows)[0]
        bucket = next((size for size in self.graph_rows if size >= rows), None)
        if self.use_cuda_graphs and bucket is not None and max(map(len, tables)) <= self.graph_table_width:
            graphed = self._graph(bucket)
            width = max(map(len, tables))
            table = torch.tensor([(*t, *(0,) * (width - len(t))) for t in tables], dtype=torch.int32)
            self.decoder.fill(graphed.inputs, token_ids, positions, slots, table.to(self.device, non_blocking=True))
            return PreparedStep(sampled_ids, graphed=graphed, num_rows=rows, sample_rows=sample)
        width = max(map(len, tables))
        inputs = self.decoder.empty_inputs(rows, width)
        table = torch.tensor([(*t, *(0,) * (width - len(t))) for t in tables], dtype=torch.int32)
        self.decoder.fill(inputs, token_ids, positions, slots, table.to(self.device))
        return PreparedStep(sampled_ids, decode=inputs, num_rows=rows, sample_rows=sample)

    def _to_device(self, *lists: Sequence[int]) -> list[torch.Tensor]:
        """int64 tensors of `lists` on the device: one host buffer (pinned on CUDA), one copy."""
        sizes = [len(values) for values in lists]
        flat = torch.tensor([v for values in lists for v in values], dtype=torch.int64)
        if self.device.type != "cuda":
            return list(flat.split(sizes))
        # a pinned block from torch's caching host allocator, which reuses it only once this copy ran
        # (one reused staging buffer could be overwritten by a later call while its copy was queued)
        return list(flat.pin_memory().to(self.device, non_blocking=True).split(sizes))

    # ---- step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, prepared: PreparedStep) -> dict[Hashable, int]:
        """Run the step; returns the greedy next token of every sampled chunk's request (one sync)."""
        if prepared.mixed is not None:
            tokens = mixed_forward(self.decoder, prepared.mixed).argmax(dim=-1)
        else:
            if prepared.graphed is not None:
                prepared.graphed.replay()
                tokens = prepared.graphed.next_tokens[:prepared.num_rows]
            else:
                tokens = self.decoder.decode(prepared.decode).argmax(dim=-1)
            if prepared.sample_rows is not None:
                tokens = tokens[prepared.sample_rows]
        return dict(zip(prepared.sampled_ids, tokens.tolist(), strict=True))

    def warm_up(self, max_rows: int) -> int:
        """CUDA graphs: capture the decode step of every row bucket up to `max_rows` now, so no
        served step waits for a capture. Returns the number captured."""
        if not self.use_cuda_graphs:
            return 0
        before = self.num_graph_captures
        for rows in self.graph_rows:
            if rows <= max(max_rows, self.graph_rows[0]):
                self._graph(rows)
        return self.num_graph_captures - before

    def _graph(self, rows: int) -> GraphedDecode:
        if rows not in self._graphs:
            with torch.no_grad():  # not inference_mode: prepare() refills the graph's inputs in place, outside it
                self._graphs[rows] = GraphedDecode(self.decoder, rows, self.graph_table_width, pool=self._graph_pool)
            self.num_graph_captures += 1
        return self._graphs[rows]

    # ---- free ----------------------------------------------------------------------------------
    def free(self) -> None:
        """Release the graphs and the KV cache; the runner cannot step afterwards."""
        self._graphs.clear()
        self.decoder.k_caches.clear()
        self.decoder.v_caches.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
