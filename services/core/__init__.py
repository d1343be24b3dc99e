"""Model code more than one service uses, owned by none: the length models and their registry,
the KNN batch-time model, the task datasets, the length metrics, and the queue's tail guard. Services import it; it
imports only `services.shared`."""
