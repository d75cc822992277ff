"""Loads the compiled extension ``nvlm_kernels._C`` if it was built, and says what it registered."""

import functools

import torch

try:
    from nvlm_kernels import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)

    LOAD_ERROR = None
except ImportError as e:  # a pure-Python install (no compiler) or a torch-version mismatch
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"

LOADED = _C is not None


@functools.cache
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the extension registered a compiled kernel for ``nvlm_kernels::<op>`` on ``dispatch_key``.
    Cached: the extension registers its kernels once, when it loads, and the dispatcher query (~3 us) was a tenth
    of a small model's quantised linear call (every op asks on every call, via ``dispatch.select``)."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"nvlm_kernels::{op}", dispatch_key)
    except RuntimeError:  # schema not defined in this build
        return False


def cpu_capability() -> str:
    return _C.cpu_capability() if LOADED else "none"


def built_with_cuda() -> bool:
    return bool(LOADED and _C.built_with_cuda())
