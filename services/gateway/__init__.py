"""OpenAI-compatible HTTP front of the batcher (services/gateway/server.py)."""
