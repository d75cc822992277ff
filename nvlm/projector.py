"""NVLM-D projector ``mlp1``: pixel shuffle + LayerNorm -> Linear -> GELU -> Linear (spec §3).

``x [T, P, C]`` (ViT patch tokens, CLS dropped; P = 1024, C = 3200)
    -> pixel shuffle (2x2 patches merged, ps_version order) + LayerNorm(4C, eps 1e-5)   [T, P/4, 4C]
       (one fused op: ``nvlm_kernels.pixel_shuffle_layernorm``)
    -> Linear(4C -> 29568, no bias) -> exact GELU -> Linear(29568 -> 8192, no bias)    [T, P/4, 8192]

State-dict keys are those of the published ``nn.Sequential``: ``mlp1.0`` (LayerNorm), ``mlp1.1``, ``mlp1.3``
(index 2 is the parameter-free GELU).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import nvlm_kernels
from nvlm.config import NVLMConfig


class Projector(nn.Sequential):
    def __init__(self, config: NVLMConfig):
        width = config.projector_input_size                       # 12800
        hidden = config.llm.intermediate_size                     # 29568 (vLLM: text_config.intermediate_size)
        super().__init__(
            nn.LayerNorm(width, eps=1e-5),
            nn.Linear(width, hidden, bias=False),
            nn.GELU(),                                            # exact erf GELU
            nn.Linear(hidden, config.llm.hidden_size, bias=False),
        )
        self.ps_version = config.ps_version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln = self[0]
        h = nvlm_kernels.pixel_shuffle_layernorm(x, ln.weight, ln.bias, ln.eps, version=self.ps_version)
        return self[3](self[2](self[1](h)))                      # [T, P/4, hidden]
