"""Old import path of `services.core.per_task_mean`, kept for model artifacts pickled under it.

See `services/predictor/length_model.py`; nothing else should import this.
"""

from services.core.per_task_mean import PerTaskMeanModel  # noqa: F401
