"""The trainer's metrics: rounds by kind and outcome, samples added, versions pushed or held back,
the last round's duration and the last candidate's validation error.

Registered in the default registry, so the trainer's /metrics (MAGNUS_TRAINER_METRICS_PORT)
serves them beside the per-RPC ones. A round that trains nothing still counts (outcome
`no_new_rows` / `no_bad_misses`): a flat `trained` rate with a rising `no_bad_misses` one means the
models fit the traffic; `failed` rounds mean the store or DB needs a look.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROUNDS = Counter(
    "magnus_trainer_rounds_total",
    "Training rounds run, by model kind and outcome (trained, no_new_rows, no_bad_misses, failed).",
    ["kind", "outcome"],
)
SAMPLES_ADDED = Counter(
    "magnus_trainer_samples_added_total", "New training samples (bad misses) the rounds used, by kind.", ["kind"]
)
VERSIONS = Counter(
    "magnus_trainer_versions_total",
    "Versions stored, by kind and decision (pushed: validated not worse than serving; held_back: worse).",
    ["kind", "decision"],
)
LAST_ROUND_DURATION = Gauge(
    "magnus_trainer_last_round_duration_seconds", "Wall time of the last round of each kind, seconds.", ["kind"]
)
CANDIDATE_ERROR = Gauge(
    "magnus_trainer_candidate_validation_error",
    "Validation error of the last trained candidate on held-back rows (metric: mae_tokens for the "
    "predictor, mae_s for the estimator); NaN when there were no held-back rows.",
    ["kind", "metric"],
)


def declare_kinds(kinds: list[str], *, outcomes: list[str]) -> None:
    """Export zeros for every kind/outcome from the start, so rates exist before the first round."""
    for kind in kinds:
        for outcome in outcomes:
            ROUNDS.labels(kind=kind, outcome=outcome)
        SAMPLES_ADDED.labels(kind=kind)
        for decision in ("pushed", "held_back"):
            VERSIONS.labels(kind=kind, decision=decision)


def observe_round(
    kind: str,
    outcome: str,
    duration_s: float,
    *,
    num_samples_added: int = 0,
    is_pushed: bool | None = None,
    error_metric: str = "",
    candidate_error: float | None = None,
) -> None:
    """One round of `kind` ended; `is_pushed` is None unless it stored a version."""
    ROUNDS.labels(kind=kind, outcome=outcome).inc()
    LAST_ROUND_DURATION.labels(kind=kind).set(duration_s)
    SAMPLES_ADDED.labels(kind=kind).inc(num_samples_added)
    if is_pushed is not None:
        VERSIONS.labels(kind=kind, decision="pushed" if is_pushed else "held_back").inc()
        if error_metric:
            CANDIDATE_ERROR.labels(kind=kind, metric=error_metric).set(
                float("nan") if candidate_error is None else candidate_error
            )
