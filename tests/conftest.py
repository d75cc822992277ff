"""Test set-up shared by the whole suite.

Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors when no GPU is present. The variable
must be set before any ``@triton.jit`` decorator runs, i.e. before nvlm_kernels is imported, hence module level.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
