"""Pure batching policy: WMA insertion, memory cap, HRRN choice, OOM split.

No I/O, no clock reads, no awaits: the batcher's scheduler and the simulator feed these functions
state and act on their answers.
"""
