"""Where the paged Triton kernels can be checked: a CUDA device, or the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from services.worker.paged import attention


def triton_device() -> torch.device | None:
    """The device the Triton kernels run on here, or None where Triton does not run."""
    if attention.triton is None:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if attention.IS_INTERPRETED else None


needs_triton = pytest.mark.skipif(triton_device() is None, reason="needs Triton on a GPU or TRITON_INTERPRET=1")
