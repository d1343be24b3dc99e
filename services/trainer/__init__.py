"""Trainer service: continuous learning of the predictor and estimator from the serving log."""
