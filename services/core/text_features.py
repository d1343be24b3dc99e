"""Turning embeddings and raw text into the predictor's numeric features. Pure functions.

The paper compresses each sentence vector by summing equal groups of its dimensions and dividing
each sum by sqrt(group size) (d_user=16 groups for the user input, d_app=4 for the instruction):
the sums keep the vector's coarse direction in a handful of features a forest can split on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SURFACE_FEATURE_NAMES = ("chars", "lines", "words", "non_ascii_share")


def group_sum(vectors: np.ndarray, num_groups: int) -> np.ndarray:
    """(n, d) -> (n, num_groups): each group of d // num_groups dims summed, / sqrt(group size).

    Trailing dims that do not fill a group are dropped (none for 384 or 768 and 4/16/32 groups).
    Linear in `vectors`, so the group sum of a mean is the mean of the group sums.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected a (n, d) array, got shape {vectors.shape}")
    dims = vectors.shape[1]
    if not 1 <= num_groups <= dims:
        raise ValueError(f"num_groups must be in [1, {dims}], got {num_groups}")
    group_size = dims // num_groups
    grouped = vectors[:, : num_groups * group_size].reshape(len(vectors), num_groups, group_size)
    return grouped.sum(axis=2) / np.float32(np.sqrt(group_size))


def surface_features(texts: Sequence[str]) -> np.ndarray:
    """(n, 4) float32: characters, lines, whitespace words and the share of non-ASCII characters.

    Cheap signals the token count misses: Chinese vs English text (non-ASCII share) changes how
    many tokens a translation needs, and code layout (lines) shapes comment length.
    """
    out = np.zeros((len(texts), len(SURFACE_FEATURE_NAMES)), dtype=np.float32)
    for i, text in enumerate(texts):
        num_chars = len(text)
        num_ascii = len(text.encode("ascii", "ignore"))
        out[i] = (num_chars, text.count("\n") + 1, len(text.split()), (num_chars - num_ascii) / max(1, num_chars))
    return out
