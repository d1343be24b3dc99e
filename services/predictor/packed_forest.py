"""Old import path of `services.core.packed_forest`, kept for model artifacts pickled under it.

See `services/predictor/length_model.py`; nothing else should import this.
"""

from services.core.packed_forest import PackedForest  # noqa: F401
