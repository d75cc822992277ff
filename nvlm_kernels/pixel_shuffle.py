"""Pixel shuffle of ViT tiles (downsample 0.5), alone or fused with the projector's LayerNorm.

Maths (spec §3). ``x: [T, N, C]`` holds each tile's ``s x s`` patch grid row-major (``N = s*s``, ``s`` even;
``s = 32``, ``C = 3200`` in NVLM-D-72B). The output ``[T, N/4, 4C]`` merges each 2x2 block of patches::

    ps_version v2: out[t, (s/2)*i + j] = concat(X[2i, 2j], X[2i, 2j+1], X[2i+1, 2j], X[2i+1, 2j+1])
    ps_version v1: the same channel blocks, token index (s/2)*j + i (transposed token order)

``pixel_shuffle_layernorm`` then applies ``LayerNorm(4C)`` to each output row with fp32 statistics, in one pass
over memory instead of InternVL's view/permute/contiguous copies followed by a separate LayerNorm.

Backends: ``cpu`` (csrc/cpu/pixel_shuffle.cpp), ``cuda`` (csrc/cuda/pixel_shuffle.cu), ``triton`` (below) and
``ref`` (the InternVL view/permute code, kept verbatim as the independent reference).
"""

import math

import torch
import torch.nn.functional as F

from nvlm_kernels import _ext, dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without Triton: the cpu/ref backends still work
    triton = None

_VERSIONS = {"v1": 1, "v2": 2, 1: 1, 2: 2}


def _version_number(version) -> int:
    if version not in _VERSIONS:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument 'version' must be 'v1' or 'v2', got {version!r}")
    return _VERSIONS[version]


def _check_input(x: torch.Tensor, name: str = "x") -> int:
    """Validate ``x: [T, N, C]`` and return the grid side ``s``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be [T, N, C], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must be float32/float16/bfloat16, "
                         f"got {x.dtype}")
    n = x.shape[1]
    side = math.isqrt(n)
    if side * side != n or side % 2 != 0 or side == 0:
        raise ValueError(f"nvlm_kernels.pixel_shuffle: argument '{name}' must have N = s*s tokens with s even, "
                         f"got N={n}")
    return side


def _check_ln_params(x, weight, bias):
    width = 4 * x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if not isinstance(p, torch.Tensor) or p.shape != (width,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"nvlm_kernels.pixel_shuffle_layernorm: argument '{name}' must have shape ({width},), "
                             f"got {shape}")
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"nvlm_kernels.pixel_shuffle_layernorm: argument '{name}' must be "
                             f"float32/float16/bfloat16, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"nvlm_kernels.pixel_shuffle_layernorm: argument '{name}' is on {p.device}, "
                             f"'x' on {x.device}")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1). One program per output row for the fused
# LayerNorm (the whole 4C row lives in registers as a [4, BLOCK_C] tile: channel block x channel); the plain shuffle
# copies the two contiguous 2C spans of each output row (blocks 0,1 = source tokens 2j, 2j+1 of row 2i are adjacent
# in memory, and so are blocks 2,3). C, the grid side and the version are constexpr: the compiler then knows C's
# divisibility (16-byte vector loads) and each model shape compiles once.
# ----------------------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _source_token(row, pair_row, pair_col, SIDE: tl.constexpr, VERSION: tl.constexpr):
        """Source token (over all tiles) at offset (pair_row, pair_col) in {0,1}^2 of output row ``row``'s 2x2
        patch block: csrc/common/pixel_shuffle.h ``source_token`` with block = 2*pair_row + pair_col."""
        HALF: tl.constexpr = SIDE // 2
        tile = row // (HALF * HALF)
        t = row % (HALF * HALF)
        if VERSION == 1:
            i = t % HALF
            j = t // HALF
        else:
            i = t // HALF
            j = t % HALF
        return tile * (SIDE * SIDE) + (2 * i + pair_row) * SIDE + 2 * j + pair_col

    @triton.jit
    def _pixel_shuffle_kernel(x_ptr, out_ptr, C: tl.constexpr, SIDE: tl.constexpr, VERSION: tl.constexpr,
                              BLOCK: tl.constexpr):
        # grid: (T*N/4 output rows, 2 spans, cdiv(2C, BLOCK)); span p = channel blocks 2p, 2p+1 (2C contiguous)
        row = tl.program_id(0).to(tl.int64)
        span = tl.program_id(1)
        offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)                       # [BLOCK] within the span
        mask = offs < 2 * C
        src = _source_token(row, span, 0, SIDE, VERSION)
        v = tl.load(x_ptr + src * C + offs, mask=mask)                              # a copy: no arithmetic
        tl.store(out_ptr + row * (4 * C) + span * (2 * C) + offs, v, mask=mask)

    @triton.jit
    def _pixel_shuffle_layernorm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, eps, C: tl.constexpr, SIDE: tl.constexpr,
                                        VERSION: tl.constexpr, BLOCK_C: tl.constexpr):
        # grid: (T*N/4 output rows,); x [T, N, C], w/b [4C] (any float dtype), out [T, N/4, 4C]
        row = tl.program_id(0).to(tl.int64)
        blk = tl.arange(0, 4)                                                       # [4] channel blocks
        offs = tl.arange(0, BLOCK_C)                                                # [BLOCK_C]
        mask = (blk[:, None] < 4) & (offs[None, :] < C)                             # [4, BLOCK_C]
        src = _source_token(row, blk // 2, blk % 2, SIDE, VERSION)                  # [4]
        x = tl.load(x_ptr + src[:, None] * C + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / (4 * C)
        d = tl.where(mask, x - mean, 0.0)                                           # two-pass variance
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) / (4 * C)
        rstd = 1.0 / tl.sqrt(var + eps)
        cols = blk[:, None] * C + offs[None, :]                                     # [4, BLOCK_C] output channel
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = d * rstd * w + b
        tl.store(out_ptr + row * (4 * C) + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


# Launch configurations, shared by the launchers and gate_specs() so the gate compiles what really runs.
_COPY_BLOCK = 1024


def _copy_config(c: int) -> dict:
    """Constexprs + launch options of ``_pixel_shuffle_kernel`` for C channels (grid: rows x 2 x cdiv(2C, BLOCK))."""
    return {"BLOCK": _COPY_BLOCK, "num_warps": 4, "num_stages": 1}


def _ln_config(c: int) -> dict:
    """Constexprs + launch options of ``_pixel_shuffle_layernorm_kernel``: the [4, BLOCK_C] row tile spread so that
    each thread holds at most 32 fp32 values of it (12800-wide rows: BLOCK_C 4096, 16 warps)."""
    block_c = triton.next_power_of_2(c)
    num_warps = max(1, min(16, 4 * block_c // (32 * 32)))
    return {"BLOCK_C": block_c, "num_warps": num_warps, "num_stages": 1}


def _triton_launch_args(cfg: dict) -> tuple[dict, dict]:
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return meta, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _check_contiguous(t: torch.Tensor, op: str, name: str):
    if not t.is_contiguous():
        raise ValueError(f"nvlm_kernels.{op}: argument '{name}' must be contiguous, got strides {t.stride()}")


def _check_version_int(version: int, op: str) -> int:
    if version not in (1, 2):
        raise ValueError(f"nvlm_kernels.{op}: argument 'version' must be 1 or 2, got {version!r}")
    return version


@torch.library.custom_op("nvlm_kernels::pixel_shuffle_triton", mutates_args=())
def _pixel_shuffle_triton(x: torch.Tensor, version: int) -> torch.Tensor:
    """Triton ``pixel_shuffle``: x [T, N, C] contiguous -> [T, N/4, 4C]; version 1 or 2."""
    side = _check_input(x)
    _check_contiguous(x, "pixel_shuffle", "x")
    _check_version_int(version, "pixel_shuffle")
    t, n, c = x.shape
    out = x.new_empty((t, n // 4, 4 * c))
    rows = t * n // 4
    if out.numel() == 0:
        return out
    meta, opts = _triton_launch_args(_copy_config(c))
    grid = (rows, 2, triton.cdiv(2 * c, meta["BLOCK"]))
    _pixel_shuffle_kernel[grid](x, out, C=c, SIDE=side, VERSION=version, **meta, **opts)
    return out


@_pixel_shuffle_triton.register_fake
def _pixel_shuffle_triton_fake(x, version):
    t, n, c = x.shape
    return x.new_empty((t, n // 4, 4 * c))


@torch.library.custom_op("nvlm_kernels::pixel_shuffle_layernorm_triton", mutates_args=())
def _pixel_shuffle_layernorm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                                    version: int) -> torch.Tensor:
    """Triton ``pixel_shuffle_layernorm``: x [T, N, C], weight/bias [4C] (any float dtype), all contiguous."""
    side = _check_input(x)
    _check_ln_params(x, weight, bias)
    for name, p in (("x", x), ("weight", weight), ("bias", bias)):
        _check_contiguous(p, "pixel_shuffle_layernorm", name)
    _check_version_int(version, "pixel_shuffle_layernorm")
    t, n, c = x.shape
    out = x.new_empty((t, n // 4, 4 * c))
    if out.numel() == 0:
        return out
    meta, opts = _triton_launch_args(_ln_config(c))
    _pixel_shuffle_layernorm_kernel[(t * n // 4,)](x, weight, bias, out, float(eps), C=c, SIDE=side,
                                                    VERSION=version, **meta, **opts)
    return out


@_pixel_shuffle_layernorm_triton.register_fake
def _pixel_shuffle_layernorm_triton_fake(x, weight, bias, eps, version):
    t, n, c = x.shape
    return x.new_empty((t, n // 4, 4 * c))


def gate_specs() -> list[dict]:
    """What the GPU gate compiles: one entry per (Triton kernel, launch configuration the package really uses) at
    NVLM-D-72B's shape, x [7, 1024, 3200] -> 12800-wide rows, in bf16 and fp16 (LayerNorm weight/bias in the
    activation dtype, as the model stores them).

    ``divisible_by_16``: every pointer (the launchers pass ``.contiguous()`` tensors: fresh allocations, parameters,
    or -- for T = 1 -- the ViT output without its CLS token, 3200 elements = 6400 bytes in), as the JIT specialises
    them; ``eps`` is a float and C/SIDE are constexprs."""
    if triton is None:
        return []
    c, side = 3200, 32
    specs = []
    for dt in ("bf16", "fp16"):
        cfg = _ln_config(c)
        specs.append({
            "name": f"pixel_shuffle_layernorm_{dt}",
            "fn": _pixel_shuffle_layernorm_kernel,
            "signature": {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                          "eps": "fp32"},
            "constexprs": {"C": c, "SIDE": side, "VERSION": 2, "BLOCK_C": cfg["BLOCK_C"]},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "hot_path": True, "tensor_cores": False, "shape": f"x [7, 1024, {c}] {dt} -> rows of {4 * c}",
            "divisible_by_16": ["x_ptr", "w_ptr", "b_ptr", "out_ptr"],
        })
        cfg = _copy_config(c)
        specs.append({
            "name": f"pixel_shuffle_{dt}",
            "fn": _pixel_shuffle_kernel,
            "signature": {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
            "constexprs": {"C": c, "SIDE": side, "VERSION": 2, "BLOCK": cfg["BLOCK"]},
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "hot_path": False,  # the projector calls the fused LayerNorm version
            "tensor_cores": False, "shape": f"x [7, 1024, {c}] {dt} -> rows of {4 * c}",
            "divisible_by_16": ["x_ptr", "out_ptr"],
        })
    return specs


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): InternVL's own sequence of views and permutes, so it is independent of the closed form
# that the kernels implement.
# ----------------------------------------------------------------------------------------------------------------
def pixel_shuffle_ref(x: torch.Tensor, version="v2") -> torch.Tensor:
    """``[T, N, C] -> [T, N/4, 4C]`` exactly as InternVL/NVLM ``pixel_shuffle(scale_factor=0.5)``."""
    v = _version_number(version)
    side = _check_input(x)
    t, _, c = x.shape
    h = x.contiguous().view(t, side, side, c)                         # [T, r, c, C] (InternVL's input is contiguous)
    h = h.view(t, side, side // 2, c * 2)                             # merge column pairs
    h = h.permute(0, 2, 1, 3).contiguous()                            # [T, c/2, r, 2C]
    h = h.view(t, side // 2, side // 2, c * 4)                        # merge row pairs
    if v == 2:
        h = h.permute(0, 2, 1, 3).contiguous()                        # back to row-major token order
    return h.reshape(t, side * side // 4, c * 4)


def pixel_shuffle_layernorm_ref(x, weight, bias, eps: float = 1e-5, version="v2") -> torch.Tensor:
    """``LayerNorm(4C)(pixel_shuffle(x))`` with fp32 statistics, output in ``x.dtype``."""
    y = pixel_shuffle_ref(x, version)
    out = F.layer_norm(y.float(), (y.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
_IMPLEMENTED = ("cuda", "triton", "cpu", "ref")


def pixel_shuffle(x: torch.Tensor, *, version="v2") -> torch.Tensor:
    """Pixel shuffle ``x: [T, N, C] -> [T, N/4, 4C]`` (see module docstring)."""
    v = _version_number(version)
    _check_input(x)
    if dispatch.needs_grad(x):
        return pixel_shuffle_ref(x, v)
    backend = dispatch.select("pixel_shuffle", x.device, _IMPLEMENTED)
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.pixel_shuffle(x.contiguous(), v)
    if backend == "triton":
        return torch.ops.nvlm_kernels.pixel_shuffle_triton(x.contiguous(), v)
    return pixel_shuffle_ref(x, v)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
                            version="v2") -> torch.Tensor:
    """``LayerNorm(pixel_shuffle(x))`` in one pass. ``weight, bias: [4C]``; fp32 statistics; output ``x.dtype``."""
    v = _version_number(version)
    _check_input(x)
    _check_ln_params(x, weight, bias)
    if dispatch.needs_grad(x, weight, bias):
        return pixel_shuffle_layernorm_ref(x, weight, bias, eps, v)
    backend = dispatch.select("pixel_shuffle_layernorm", x.device, _IMPLEMENTED)
    if backend in ("cpu", "cuda"):
        return torch.ops.nvlm_kernels.pixel_shuffle_layernorm(x.contiguous(), weight.contiguous(),
                                                              bias.contiguous(), float(eps), v)
    if backend == "triton":
        return torch.ops.nvlm_kernels.pixel_shuffle_layernorm_triton(x.contiguous(), weight.contiguous(),
                                                                     bias.contiguous(), float(eps), v)
    return pixel_shuffle_layernorm_ref(x, weight, bias, eps, v)


# ----------------------------------------------------------------------------------------------------------------
# Fakes (shape/dtype only) for the compiled ops, so torch.compile and opcheck can trace them.
# ----------------------------------------------------------------------------------------------------------------
if _ext.LOADED:

    @torch.library.register_fake("nvlm_kernels::pixel_shuffle")
    def _pixel_shuffle_fake(x, version):
        t, n, c = x.shape
        return x.new_empty((t, n // 4, 4 * c))

    @torch.library.register_fake("nvlm_kernels::pixel_shuffle_layernorm")
    def _pixel_shuffle_layernorm_fake(x, weight, bias, eps, version):
        t, n, c = x.shape
        return x.new_empty((t, n // 4, 4 * c))
