"""One batching policy per file; policy/registry.py names them."""
