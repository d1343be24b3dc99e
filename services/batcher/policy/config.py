"""Kept for the callers that import the policy names and factory from here; they live in registry.py."""

from services.batcher.policy.registry import (  # noqa: F401
    CONTINUOUS_POLICY_NAMES,
    POLICY_NAMES,
    SERVING_POLICY_NAMES,
    make_policy,
)
