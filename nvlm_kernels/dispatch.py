"""The only place that picks a backend for an op.

Backends, in order of preference for each device:

* CUDA tensor: ``cuda`` (CUDA C++ kernel in the extension) -> ``triton`` -> ``ref``
* CPU tensor:  ``cpu`` (C++ kernel in the extension) -> ``ref``; ``triton`` only when forced and
  ``TRITON_INTERPRET=1`` (the interpreter runs Triton kernels on CPU tensors; tests use it).

``NVLM_KERNELS_BACKEND=ref|triton|cuda|cpu`` (or :func:`force_backend`) forces one; forcing a backend that the op
or the device does not have raises instead of silently falling back, so a comparison never measures the wrong
thing. Each op module lists the backends it implements and calls :func:`select`.
"""

import contextlib
import functools
import os
import threading
from collections import Counter

import torch

from nvlm_kernels import _ext

BACKENDS = ("cuda", "triton", "cpu", "ref")

_local = threading.local()
#: (op, backend) -> number of calls; the demo and benchmarks report which kernels really ran.
usage: Counter = Counter()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    forced = getattr(_local, "forced", None) or os.environ.get("NVLM_KERNELS_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"NVLM_KERNELS_BACKEND={forced!r} is not one of {BACKENDS}")
    return forced


@contextlib.contextmanager
def force_backend(name: str | None):
    """Force ``name`` for every op called in this thread inside the ``with`` block (``None`` = automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {BACKENDS}")
    previous = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = previous


def available(op: str, device: torch.device, implemented: tuple[str, ...]) -> list[str]:
    """Backends that can run ``op`` on ``device`` in this install, best first."""
    out = []
    if device.type == "cuda":
        if "cuda" in implemented and _ext.has_kernel(op, "CUDA"):
            out.append("cuda")
        if "triton" in implemented and triton_available():
            out.append("triton")
    elif device.type == "cpu":
        if "cpu" in implemented and _ext.has_kernel(op, "CPU"):
            out.append("cpu")
        if "triton" in implemented and triton_available() and triton_interpreted():
            out.append("triton")  # never chosen automatically on CPU: only when forced
    out.append("ref")
    return out


@torch.compiler.assume_constant_result
def select(op: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` and count it in :data:`usage`.

    Under ``torch.compile`` the choice is made once, while tracing, and baked into the graph (dynamo cannot trace
    the dispatcher queries inside), so every op works with ``fullgraph=True``."""
    can = available(op, device, implemented)
    forced = forced_backend()
    if forced is not None:
        if forced not in can:
            raise RuntimeError(
                f"nvlm_kernels.{op}: backend {forced!r} was forced but is not available for a {device.type} tensor "
                f"here (available: {can})")
        choice = forced
    else:
        choice = can[0]
        if choice == "triton" and device.type == "cpu":
            choice = "ref"
    usage[(op, choice)] += 1
    return choice


def needs_grad(*tensors) -> bool:
    """True when autograd must differentiate through an op called on ``tensors``. The compiled and Triton kernels
    are forward-only (inference first), so ops then take their differentiable ``<op>_ref`` path instead."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
