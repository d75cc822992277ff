"""nvlm: NVLM 1.0 (NVLM-D, NVLM-X, NVLM-H) in plain PyTorch on top of nvlm_kernels.

Names are imported lazily so that ``import nvlm`` is cheap and the CLI starts fast.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "NVLM": "nvlm.model",
    "NVLMConfig": "nvlm.config",
    "NVLMProcessor": "nvlm.processor",
    "quantize_": "nvlm.quant",
    "Int8WeightOnly": "nvlm.quant",
    "Int4WeightOnly": "nvlm.quant",
    "QuantLinear": "nvlm.quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nvlm' has no attribute {name!r}")
