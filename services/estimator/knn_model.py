"""Old import path of `services.core.knn_model`, kept for model artifacts pickled under it.

Artifacts (joblib = pickle) name classes by module; versions saved before the move reference
`services.estimator.knn_model`. New artifacts name `services.core.knn_model`. Nothing else should
import this.
"""

from services.core.knn_model import BatchShape, KnnBatchTimeModel, TimeSample  # noqa: F401
