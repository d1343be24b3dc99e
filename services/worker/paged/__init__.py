"""Paged KV cache, ragged paged decode attention and a CUDA-graph-replayable decode step (issue 23)."""
