"""Magnus worker: runs leased batches on one device with a transformers causal LM."""
