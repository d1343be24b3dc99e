"""Continuous batching on a GPU: tokens vs the static engine alone (fp32, graphs on), step timing
ragged vs static (7B shape, bf16), end-to-end throughput continuous vs static batches."""
import gc, json, os, random, sys, time
sys.path.insert(0, ".")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from services.worker.engine import StaticBatchEngine, EngineItem
from services.worker.continuous import ContinuousBatcher

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
BIG = DEV == "cuda" and "--small-only" not in sys.argv
OUT = os.environ.get("OUT", "/tmp")
results = {}

class Tok:
    pad_token_id, eos_token_id = 0, 1
    def __call__(self, texts, **kw):
        return {"input_ids": [[2 + (ord(c) * 7 + i) % 250 for i, c in enumerate(t)] for t in texts]}
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))
    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(r) for r in rows]

def build(shape, dtype, init=0.02):
    torch.manual_seed(0)
    config = LlamaConfig(**shape, eos_token_id=1, pad_token_id=0, bos_token_id=1, initializer_range=init)
    prev = torch.get_default_dtype(); torch.set_default_dtype(dtype)
    try:
        with torch.device(DEV):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(prev)

def engine_for(model, dtype, trace_replay, reserve_gib):
    return StaticBatchEngine("m", device=DEV, dtype=dtype, backend="static", loaded=(model, Tok()),
                             trace_replay=trace_replay, cuda_reserve_bytes=int(reserve_gib * 2**30),
                             cpu_kv_budget_bytes=2**30)

def sync():
    if DEV == "cuda": torch.cuda.synchronize()

# ---- 1. tokens: continuous == static alone (fp32, graphs + compile on a GPU) ----
small = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
model = build(small, torch.float32, init=0.5)
eng = engine_for(model, "float32", False, 4 if DEV == "cuda" else 0)
rng = random.Random(0)
items = [EngineItem(f"r{i}", "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(0, 300))), rng.randint(1, 120))
         for i in range(40)]
alone = [eng.run([it]).items[0] for it in items]
b = ContinuousBatcher(eng, 8); b.start()
futs = []
for it in items:
    futs.append(b.submit(it)); time.sleep(rng.random() * 0.01)
got = [f.result(300).output for f in futs]
b.stop()
mism = [i for i, (g, a) in enumerate(zip(got, alone)) if g != a]
results["tokens_match"] = f"{len(items) - len(mism)}/{len(items)}"
results["mismatches"] = [(items[i].request_id, got[i].generated_tokens, alone[i].generated_tokens,
                          next((k for k, (x, y) in enumerate(zip(got[i].text.split(), alone[i].text.split())) if x != y), None))
                         for i in mism]
results["graph_keys_small"] = sorted(k for k in eng.static._graphs)[:6] + [len(eng.static._graphs)]
print(json.dumps(results), flush=True)
del b, eng, model; gc.collect()
if DEV == "cuda": torch.cuda.empty_cache()

# ---- 2. step timing and throughput on a 7B shape (bf16) ----
if BIG:
    shape = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    model = build(shape, torch.bfloat16)
    eng = engine_for(model, "bfloat16", True, 8)
    st = eng.static
    B, L, G = 64, 512, 64
    prompts = [[rng.randrange(2, 32000) for _ in range(L)] for _ in range(B)]
    def time_steps(state, attend, n=50):
        for _ in range(3): st.decode_step(state, B, attend)
        sync(); t = time.perf_counter()
        for _ in range(n): st.decode_step(state, B, attend)
        sync(); return (time.perf_counter() - t) / n * 1e3
    with torch.inference_mode():
        st.generate(prompts, 0, [G] * B, set())  # captures the static graphs
        s_state = st.state_for(B)
        s_state.write_index.fill_(L); s_state.positions.fill_(L)
        static_ms = time_steps(s_state, L + 1)
        r_state = st.state_for(B, is_ragged=True)
        r_state.write_index.fill_(L); r_state.positions.fill_(L); r_state.mask[..., :L + 1] = 0
        ragged_ms = time_steps(r_state, L + 1)
    results["step_ms_B64_L512"] = dict(static=round(static_ms, 3), ragged=round(ragged_ms, 3))
    print(json.dumps(results), flush=True)
    # end-to-end: 256 requests, prompts 64..512 tokens, 32..256 new tokens (trace replay)
    reqs = [(rng.randint(64, 512), rng.randint(32, 256)) for _ in range(256)]
    text = lambda n: "".join(rng.choice("abcdefghij") for _ in range(n))
    its = [EngineItem(f"q{i}", text(p), g) for i, (p, g) in enumerate(reqs)]
    valid = sum(g for _, g in reqs)
    for _ in range(2):  # the first pass captures the graphs
        sync(); t = time.perf_counter()
        for k in range(0, len(its), B):
            eng.run(its[k:k + B])
        sync(); static_s = time.perf_counter() - t
    b = ContinuousBatcher(eng, B); b.start()
    for _ in range(2):
        t = time.perf_counter()
        futs = [b.submit(it) for it in its]
        outs = [f.result(600) for f in futs]
        cont_s = time.perf_counter() - t
        print("continuous pass", round(cont_s, 2), "static", round(static_s, 2), flush=True)
    b.stop()
    assert [o.output.generated_tokens for o in outs] == [g for _, g in reqs]
    results["e2e_256_requests"] = dict(valid_tokens=valid, static_s=round(static_s, 2), continuous_s=round(cont_s, 2),
                                       static_tok_s=round(valid / static_s), continuous_tok_s=round(valid / cont_s),
                                       graphs=len(st._graphs))
print(json.dumps(results), flush=True)
json.dump(results, open(os.path.join(OUT, "ccb_gpu.json"), "w"), indent=1)
