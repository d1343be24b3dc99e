"""Old import path of `services.core.encoders`, kept for model artifacts pickled under it.

See `services/predictor/length_model.py`; nothing else should import this.
"""

from services.core.encoders import SentenceEncoder, StaticEncoder  # noqa: F401
