"""Old import path of `services.core.per_app_linear`, kept for model artifacts pickled under it.

See `services/predictor/length_model.py`; nothing else should import this.
"""

from services.core.per_app_linear import Line, PerAppLinearModel  # noqa: F401
