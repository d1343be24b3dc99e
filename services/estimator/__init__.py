"""Batch-time estimator service: how long a batch of a given shape takes to run."""
