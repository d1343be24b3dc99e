"""The paged decode step's logits equal transformers' own forward pass with the same weights.

Rows start at different steps (so every step mixes positions) and each token is fed as one decode
step, its K/V written through a BlockPool's slots into scattered blocks. The fused kernels are
compared with their torch versions where Triton runs (GPU, or TRITON_INTERPRET=1 with numpy < 2).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from services.worker.paged import attention
from services.worker.paged.decode_step import GraphedDecode, PagedDecoder, PagedModelConfig, PagedWeights
from services.worker.paged.kv_blocks import BlockPool
from services.worker.paged.skinny_gemm import default_launch
from tests.worker.paged_support import needs_triton, triton_device

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rms_norm_eps=1e-6)


def tiny_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=4))
    else:  # qwen2: q/k/v biases and grouped-query heads
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2, rope_theta=1e4))
    return model.float().eval()


def run_staggered(decoder: PagedDecoder, sequences: list[list[int]], starts: list[int], bucket: int):
    """Feed every sequence token by token, sequence i from step starts[i]; returns each sequence's
    logits [len, vocab] as the step computed them."""
    pool = BlockPool(decoder.num_blocks, decoder.block_tokens)
    gen = torch.Generator().manual_seed(1)
    pool._free = type(pool._free)(torch.randperm(decoder.num_blocks, generator=gen).tolist())
    inputs = decoder.empty_inputs(bucket, table_width=8)
    logits = [[] for _ in sequences]
    for step in range(max(s + len(seq) for s, seq in zip(starts, sequences, strict=True))):
        live = [i for i, (s, seq) in enumerate(zip(starts, sequences, strict=True)) if s <= step < s + len(seq)]
        slots = []
        for i in live:
            if i not in pool:
                pool.allocate(i, 1)
                slots.append(pool.slot(i, 0))
            else:
                slots.append(pool.grow(i))
        tokens = [sequences[i][step - starts[i]] for i in live]
        positions = [pool.num_tokens(i) - 1 for i in live]
        decoder.fill(inputs, tokens, positions, slots, pool.table_tensor(live))
        out = decoder.decode(inputs)
        for row, i in enumerate(live):
            logits[i].append(out[row])
        for i in live:
            if step - starts[i] == len(sequences[i]) - 1:
                pool.free(i)
    assert pool.num_free_blocks == pool.num_blocks
    return [torch.stack(rows) for rows in logits]


@pytest.mark.parametrize("kind,kv_layout",
                         [("llama", "token_major"), ("qwen2", "token_major"), ("qwen2", "head_major")])
def test_paged_step_logits_equal_transformers(kind, kv_layout):
    model = tiny_model(kind)
    config = PagedModelConfig.from_hf(model.config)
    assert config.has_qkv_bias == (kind == "qwen2")
    decoder = PagedDecoder(config, PagedWeights.from_hf(model), num_blocks=40, block_tokens=4, use_triton=False,
                           kv_layout=kv_layout)
    gen = torch.Generator().manual_seed(2)
    lengths, starts = [9, 3, 14, 6], [0, 2, 1, 5]
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    paged = run_staggered(decoder, sequences, starts, bucket=4)
    with torch.no_grad():
        for seq, got in zip(sequences, paged, strict=True):
            expected = model(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_padding_rows_change_no_live_row():
    model = tiny_model("qwen2")
    config = PagedModelConfig.from_hf(model.config)
    weights = PagedWeights.from_hf(model)
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (5, 7)]
    exact = run_staggered(PagedDecoder(config, weights, 20, 4, use_triton=False), sequences, [0, 1], bucket=2)
    padded = run_staggered(PagedDecoder(config, weights, 20, 4, use_triton=False), sequences, [0, 1], bucket=8)
    for a, b in zip(exact, padded, strict=True):
        torch.testing.assert_close(a, b)


@needs_triton
@pytest.mark.parametrize("kind,kv_layout", [("llama", "token_major"), ("qwen2", "head_major")])
def test_triton_step_equals_torch_step(kind, kv_layout):
    device = triton_device()
    model = tiny_model(kind)
    config = PagedModelConfig.from_hf(model.config)
    weights = PagedWeights.from_hf(model.to(device))
    gen = torch.Generator().manual_seed(4)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (6, 4, 9)]
    decoders = [PagedDecoder(config, weights, 30, 4, use_triton=flag, kv_layout=kv_layout) for flag in (False, True)]
    matrices = [weights.lm_head]
    matrices += [m for layer in weights.layers for m in (layer.qkv, layer.out, layer.gate_up, layer.down)]
    decoders[1].gemm_launch = {tuple(m.shape): dict(block_n=32, block_k=32, num_stages=2) for m in matrices}
    steps = [run_staggered(decoder, sequences, [0, 2, 1], bucket=4) for decoder in decoders]
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(b, a, rtol=3e-3, atol=3e-3)


@needs_triton
@pytest.mark.parametrize("bucket", [2, 32])
def test_default_skinny_launches_equal_torch_step(bucket):
    """Without swept launches a step of <= skinny_gemm_rows rows runs skinny_gemm.default_launch's
    kernels (every K here a multiple of 128; at 32 rows only `down`, split along K) and gives the
    torch step's logits."""
    device = triton_device()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 256},
                                         num_key_value_heads=4)).float().eval()
    config = PagedModelConfig.from_hf(model.config)
    weights = PagedWeights.from_hf(model.to(device))
    matrices = [weights.lm_head, *(m for layer in weights.layers for m in (layer.qkv, layer.out, layer.gate_up,
                                                                           layer.down))]
    assert all(default_launch(tuple(m.shape)) is not None for m in matrices)
    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (5, 3)]
    decoders = [PagedDecoder(config, weights, 30, 4, use_triton=flag) for flag in (False, True)]
    steps = [run_staggered(decoder, sequences, [0, 1], bucket=bucket) for decoder in decoders]
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(b, a, rtol=3e-3, atol=3e-3)


def test_default_launch_follows_the_swept_winners():
    assert default_launch((22016, 4096)) == dict(block_n=64, block_k=128, num_stages=3, num_warps=4)  # gate/up
    assert default_launch((4096, 11008)) == dict(block_n=32, block_k=256, num_stages=5, num_warps=4)  # down
    assert default_launch((4608, 3584))["block_k"] == 256  # 3,584 = 14 x 256
    assert default_launch((100, 96)) is None  # K not a multiple of 128: torch's product
    # 17-64 rows: only the deep down projection, split along K; the rest cuBLAS; beyond 64 all cuBLAS
    assert default_launch((3584, 18944), rows=48) == dict(block_n=64, block_k=128, num_stages=3, num_warps=4,
                                                          splits=4)
    assert default_launch((37888, 3584), rows=48) is None
    assert default_launch((3584, 18944), rows=96) is None


@pytest.mark.skipif(not torch.cuda.is_available() or attention.triton is None, reason="CUDA graphs need a GPU")
def test_graph_replay_follows_new_inputs():
    model = tiny_model("qwen2").cuda()
    decoder = PagedDecoder(PagedModelConfig.from_hf(model.config), PagedWeights.from_hf(model), 30, 4)
    for cache in decoder.k_caches + decoder.v_caches:
        cache.normal_()
    pool = BlockPool(30, 4)
    lengths = [5, 9, 2]
    for row, length in enumerate(lengths):
        pool.allocate(row, length)
    graphed = GraphedDecode(decoder, batch=4, table_width=4)
    for step in range(3):  # each step: every row one token longer, so new slots, lengths and blocks
        rows = dict(token_ids=[3 + step, 7, 11 - step], positions=[pool.num_tokens(r) - 1 for r in range(3)],
                    slot_mapping=[pool.slot(r, pool.num_tokens(r) - 1) for r in range(3)],
                    block_tables=pool.table_tensor(range(3)))
        decoder.fill(graphed.inputs, **rows)
        graphed.replay()
        eager_inputs = decoder.empty_inputs(4, 4)
        decoder.fill(eager_inputs, **rows)
        eager = decoder.decode(eager_inputs)
        torch.testing.assert_close(graphed.logits[:3], eager[:3], rtol=1e-5, atol=1e-5)
        assert graphed.next_tokens[:3].tolist() == eager[:3].argmax(-1).tolist()
        for row in range(3):
            pool.grow(row)


def test_shared_weights_store_each_matrix_once_and_keep_the_model_s_forward():
    model = tiny_model("qwen2")
    tokens = torch.tensor([[5, 17, 3, 60, 2]])
    with torch.no_grad():
        before = model(tokens).logits
    weights = PagedWeights.from_hf(model, share=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, before)
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == weights.layers[0].qkv[attn.q_proj.weight.shape[0]:].data_ptr()
    assert attn.o_proj.weight.data_ptr() == weights.layers[0].out.data_ptr()
    assert model.lm_head.weight.data_ptr() == weights.lm_head.data_ptr()
    copied = PagedWeights.from_hf(model)
    assert copied.lm_head.data_ptr() != model.lm_head.weight.data_ptr()
