"""Model code more than one service uses, owned by none: the length models and their registry,
the KNN batch-time model, the task datasets, and the length metrics. Services import it; it
imports only `services.shared`."""
