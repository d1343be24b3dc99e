"""Old import path of `services.core.length_model`, kept for model artifacts pickled under it.

Artifacts (joblib = pickle) name classes by module; versions saved before the move reference
`services.predictor.*`. New artifacts name `services.core.*`. Nothing else should import this.
"""

from services.core.length_model import LengthSample  # noqa: F401
