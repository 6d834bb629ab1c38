"""Where a test runs: ``CUDA`` is a parametrize value that is marked ``gpu`` and skipped without a CUDA device, so
one test body checks the CPU here and the GPU where there is one (``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
)
CPU_AND_CUDA = ["cpu", CUDA]
