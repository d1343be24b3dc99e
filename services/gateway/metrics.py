"""The gateway's Prometheus metrics (served at /metrics on its HTTP port)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter(
    "magnus_gateway_requests_total", "HTTP requests answered, by route and HTTP status.", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "magnus_gateway_request_seconds", "Request to last byte (streams: to [DONE]), seconds.", ["route", "stream"],
    buckets=SECONDS_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "magnus_gateway_time_to_first_token_seconds", "Streamed requests: request to the first text chunk sent, seconds.",
    buckets=SECONDS_BUCKETS,
)
CLIENT_DISCONNECTS = Counter(
    "magnus_gateway_client_disconnects_total", "Clients that left before their answer: their batcher call was cancelled."
)
STOPPED_BY_SEQUENCE = Counter(
    "magnus_gateway_stop_sequence_total", "Requests ended at a stop sequence (the batcher call is cancelled there)."
)
