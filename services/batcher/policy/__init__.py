"""Pure batching policy: no I/O, no clock reads, no awaits; the scheduler and the simulator feed it
state and act on its answers.

  rules.py       the paper's rules, each defined once (WMA term, response ratio, MEM(B), the KV cap)
  columns.py     the queue decisions as array kernels over per-batch columns, built from rules.py
  pack.py        dispatch-time packing's window search (magnus_pack), built from rules.py
  base.py        the Policy protocol and the knobs; families/ one class per policy; registry.py names them
  batch.py, batch_queue.py   queued batches and the indexed queue the policies decide over
  split.py       failure recovery (OOM split, retries); wait.py deadline-aware admission
"""
