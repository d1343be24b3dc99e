"""Validating batch shapes. No I/O, no clock."""

from __future__ import annotations

from collections.abc import Sequence

from services.estimator.config import EstimatorSettings
from services.core.knn_model import BatchShape
from services.shared.errors import InvalidArgument
from services.shared.validation import check_range


def validate_shapes(shapes: Sequence[BatchShape], settings: EstimatorSettings) -> None:
    """Raise InvalidArgument naming the first bad field (e.g. `shapes[2].gen_tokens_max`)."""
    if not shapes:
        raise InvalidArgument("shapes", "must hold at least one shape")
    if len(shapes) > settings.max_shapes:
        raise InvalidArgument("shapes", f"holds {len(shapes)} shapes, the limit is {settings.max_shapes}")
    for i, shape in enumerate(shapes):
        check_range(f"shapes[{i}].batch_size", shape.batch_size, low=1, high=settings.max_batch_size)
        check_range(f"shapes[{i}].input_tokens_max", shape.input_tokens_max, low=1, high=settings.max_tokens)
        check_range(f"shapes[{i}].gen_tokens_max", shape.gen_tokens_max, low=1, high=settings.max_tokens)
