"""Old import path of `services.core.embedding_forest`, kept for model artifacts pickled under it.

See `services/predictor/length_model.py`; nothing else should import this.
"""

from services.core.embedding_forest import EmbeddingForestModel, ForestConfig, _ForestPredict  # noqa: F401
