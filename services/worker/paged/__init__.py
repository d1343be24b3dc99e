"""The paged continuous engine (issue 23), nano-vllm's split:

- kv_blocks.BlockPool: block bookkeeping (check-then-act verbs);
- scheduler.Scheduler: pure; queues, admission by predicted length (projection.py) or greedy, chunked prefill in a
  token budget, preemption and resume by recompute;
- runner.ModelRunner: prepare / step / free over a plan's chunks (decode_step.PagedDecoder for decode
  rows, as CUDA graphs on a GPU; mixed_step for steps with prefill chunks);
- engine.PagedEngine: schedule -> run -> update, results per request;
- serving.PagedBatcher: the engine behind the worker's continuous pull loop (MAGNUS_WORKER_BACKEND=paged).
Kernels: attention (ragged paged decode), fused_ops, skinny_gemm.
"""
