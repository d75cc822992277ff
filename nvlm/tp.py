"""Tensor parallelism (Megatron style) for NVLM inference on ``torch.distributed`` process groups.

Run one process per GPU (``torchrun --nproc-per-node N``; NCCL on GPUs, gloo on CPU) and load with
``NVLM.from_pretrained(path, tp_size=N)``. Every rank holds:

=========================================  =====================  ==================================================
module (under ``language_model.``)         split                  communication
=========================================  =====================  ==================================================
``model.embed_tokens``                     vocab rows (dim 0)     all-reduce (exactly one rank contributes a row)
``*.self_attn.{q,k,v}_proj`` (+ bias)      output rows (dim 0)    none: each rank owns heads/N q and kv heads/N
``*.self_attn.o_proj``                     input columns (dim 1)  all-reduce of the partial products
``*.mlp.{gate,up}_proj``                   output rows (dim 0)    none
``*.mlp.down_proj``                        input columns (dim 1)  all-reduce
``model.xattn_layers.*`` (NVLM-X/H)        as the decoder layers  all-reduce after ``o_proj`` and ``mlp.down_proj``
``lm_head``                                vocab rows (dim 0)     all-gather: every rank gets the full logits
everything else                            replicated             none
=========================================  =====================  ==================================================

The vision tower (InternViT), ``mlp1`` and all norms are replicated: each rank runs them whole (the ViT is 5.9B of
NVLM-D-72B's 79B parameters; its 32 padded heads would divide by 2/4/8, but the tiny test presets pad to 3 heads,
so splitting it is left for later). Head counts must divide: ``num_key_value_heads % tp_size == 0`` (8 KV heads in
Qwen2-72B -> tp 1, 2, 4 or 8) and ``vocab_size % tp_size == 0``.

Row-parallel layers are the modules of the single-process model with a narrower weight plus a forward hook that
all-reduces their output, so state-dict keys, ``QuantLinear`` and the kernels are unchanged. A row-parallel bias
would be added N times; none of these layers has one (Qwen2's o/down have no bias), which is checked.

Loading (:func:`load_pretrained_tp`): the checkpoint is validated like ``nvlm.loading.load_pretrained`` (keys,
shapes, dtypes from the headers), then each rank reads from the shard files only its own slices with plain file
reads (dim-0 slices: one contiguous read; dim-1 slices: one read per row of the slice) and replicated tensors
whole; no rank reads another rank's slice. Quantisation (``Int8WeightOnly`` / ``Int4WeightOnly``) happens per rank
on its slice while streaming, exactly as the single-process loader quantises whole weights:

* which Linears are quantised is decided on the unsplit model (the same choice as one process makes), then applied
  to the split model;
* int8 is per output row (scale = row absmax / 127). Column slices are whole rows. A row-parallel rank holds a
  K-slice of every row, so before quantising it the ranks all-reduce (MAX) their row absmax: each rank then uses the
  single-process scale of the whole row and its int8 values are bit-for-bit the slice of the single-process ones;
* int4 groups run along K. Column-parallel splits cut rows, never a group. Row-parallel splits cut K at
  ``rank * K/N``: :func:`check_int4_groups` raises ``ValueError`` (naming the layer, K, N and the group size) unless
  ``K/N`` is a multiple of the group size, so every group lies inside one rank's slice and is quantised from
  exactly the values it has in one process; each rank's packed ``qweight``/``scales``/``zeros`` are then
  bit-for-bit the slice of the single-process ones. The MLPs' intermediate size is the exception that would fail
  this for NVLM-D-72B (``down_proj`` K = 29568 = 231 x 128; 29568 / 2, 4, 8 is not a multiple of 128): there
  :func:`mlp_intermediate_padded` zero-pads the intermediate size to a multiple of ``tp_size * group_size``
  (29568 -> 29696 at g128 for tp 2, 4 and 8, what Qwen's own int4 releases of Qwen2-72B do for tensor
  parallelism): ``gate_proj``/``up_proj`` get zero rows and ``down_proj`` zero columns at the END of the
  intermediate dimension, so every real group keeps its columns (the padding adds whole groups after the last
  one, as the unpadded size is a multiple of the group size), padded groups quantise to exact zeros
  (scale 2/15, zero point 8, q = 8), and silu(0) * 0 = 0 adds exactly nothing. The last rank(s) hold the padding.
  ``o_proj`` (K = heads x head_dim) is never padded: :func:`check_int4_groups` raises for it. A pre-quantised
  checkpoint is sliced, not re-quantised, and is never padded (the same check raises).

Numerics: the embedding all-reduce and the logits all-gather are exact. A row-parallel all-reduce sums N partial
products that were each rounded to the activation dtype, instead of rounding one full sum: in bf16 that is up to
one extra bf16 rounding (2^-9 relative) per row-parallel layer, which is what Megatron and vLLM do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nvlm.config import NVLMConfig

_LAYER = r"language_model\.model\.(?:layers|xattn_layers)\.\d+\."
#: module names (full, unsplit model) split along the output dim (weights dim 0).
COLUMN_RE = re.compile(rf"^(?:{_LAYER}(?:self_attn|cross_attn)\.[qkv]_proj|{_LAYER}mlp\.(?:gate|up)_proj"
                       rf"|language_model\.lm_head)$")
#: module names split along the input dim (weights dim 1) and all-reduced.
ROW_RE = re.compile(rf"^{_LAYER}(?:(?:self_attn|cross_attn)\.o_proj|mlp\.down_proj)$")
VOCAB_RE = re.compile(r"^language_model\.model\.embed_tokens$")
#: the MLP Linears whose intermediate dimension may be zero-padded for int4 (mlp_intermediate_padded).
MLP_RE = re.compile(rf"^{_LAYER}mlp\.(?:gate|up|down)_proj$")
LM_HEAD = "language_model.lm_head"


# ----------------------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------------------
def init_tp(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment if needed; return ``(rank, world_size)``.

    Backend: NCCL for a CUDA ``device``, gloo otherwise."""
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("tensor parallelism: no process group and no torchrun environment (RANK, WORLD_SIZE); "
                             "start with `torchrun --nproc-per-node N -m nvlm ...`")
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` without an index -> this process's GPU (``LOCAL_RANK``); anything else unchanged."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


# ----------------------------------------------------------------------------------------------------------------
# Which tensor is split how
# ----------------------------------------------------------------------------------------------------------------
def shard_dim(key: str) -> int | None:
    """Dimension along which state-dict ``key`` (of the unsplit model, float or quantised layout) is split across
    ranks; None: replicated."""
    module, _, leaf = key.rpartition(".")
    if COLUMN_RE.match(module) or VOCAB_RE.match(module):
        return 0                           # weight/bias/qweight/scale(s)/zeros: all per output row
    if ROW_RE.match(module):
        if leaf in ("weight", "qweight", "scales", "zeros"):
            return 1                       # along K (packed int4: K/2 bytes, K/g groups: same fraction)
        if leaf == "scale":
            return None                    # int8 per-output-row scale: every rank has every row
        raise ValueError(f"tensor parallelism: row-parallel layer {module!r} has a {leaf!r}; a bias would be added "
                         f"once per rank by the all-reduce and is not supported")
    return None


def check_tp_config(config: NVLMConfig, tp_size: int, intermediate: int | None = None) -> None:
    """ValueError naming the size that ``tp_size`` does not divide (``intermediate``: the padded MLP size)."""
    llm = config.llm
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tensor parallelism: argument 'tp_size' must be a positive int, got {tp_size!r}")
    for name, value in (("num_key_value_heads", llm.num_key_value_heads),
                        ("num_attention_heads", llm.num_attention_heads),
                        ("intermediate_size", intermediate or llm.intermediate_size),
                        ("vocab_size", llm.vocab_size)):
        if value % tp_size:
            raise ValueError(f"tensor parallelism: llm_config.{name} = {value} is not divisible by tp_size = "
                             f"{tp_size}")


def mlp_intermediate_padded(intermediate: int, tp_size: int, group_size: int | None) -> int:
    """The MLP intermediate size to split: ``intermediate`` itself when each rank's share is a whole number of
    int4 groups (or there is no int4 / the single-process model leaves down_proj unquantised: pass None), else
    the next multiple of ``tp_size * group_size`` (zero padding; module docstring)."""
    if group_size is None or intermediate % group_size:
        return intermediate
    step = tp_size * group_size
    return -(-intermediate // step) * step


def check_int4_groups(model: nn.Module, tp_size: int, group_size: int, selected: set[str],
                      skip_mlp: bool = False) -> None:
    """Every row-parallel Linear in ``selected`` (to be int4-quantised) must split K at group boundaries
    (``skip_mlp``: the MLPs are padded to make theirs fit)."""
    for name, module in model.named_modules():
        if skip_mlp and MLP_RE.match(name):
            continue
        if name in selected and ROW_RE.match(name) and isinstance(module, nn.Linear):
            k = module.in_features
            if k % tp_size or (k // tp_size) % group_size:
                raise ValueError(f"tensor parallelism: int4 layer {name!r} has K = {k}; split {tp_size} ways each "
                                 f"rank gets K = {k / tp_size:g}, not a multiple of group_size = {group_size}, so a "
                                 f"quantisation group would straddle two ranks. Use a group size dividing "
                                 f"{k // tp_size if k % tp_size == 0 else 'K/tp'} or another tp_size")


# ----------------------------------------------------------------------------------------------------------------
# Parallel modules
# ----------------------------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V/N)`` of the embedding table; the others come from the other ranks by all-reduce
    (each id's row is non-zero on exactly one rank, so the sum is exact). Key: ``weight`` as ``nn.Embedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, tp_size: int, group=None,
                 device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.local = num_embeddings // tp_size
        self.start = rank * self.local
        self.group = group
        self.weight = nn.Parameter(torch.empty(self.local, embedding_dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.local)
        out = F.embedding(local.clamp(0, self.local - 1), self.weight)          # [..., H]
        out = out.masked_fill(~inside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.group)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.start}, {self.start + self.local})"


def _all_reduce_hook(group):
    def hook(module, inputs, output):
        dist.all_reduce(output, group=group)       # sum of the ranks' partial products x[:, K_r] @ W[:, K_r]^T
        return output
    return hook


def _all_gather_last_hook(group, tp_size: int):
    def hook(module, inputs, output):
        parts = [torch.empty_like(output) for _ in range(tp_size)]
        dist.all_gather(parts, output.contiguous(), group=group)
        return torch.cat(parts, dim=-1)            # [..., V]: rank r's vocab slice at [r*V/N, (r+1)*V/N)
    return hook


def _narrow_linear(linear: nn.Linear, dim: int, tp_size: int, full: int | None = None) -> nn.Linear:
    """A meta ``nn.Linear`` with ``1/tp_size`` of ``linear``'s output (dim 0) or input (dim 1) features (of
    ``full`` features when given: a zero-padded size)."""
    out_f, in_f = linear.out_features, linear.in_features
    if dim == 0:
        out_f = (full or out_f) // tp_size
    else:
        in_f = (full or in_f) // tp_size
        if linear.bias is not None:
            raise ValueError("tensor parallelism: a row-parallel Linear with a bias is not supported")
    return nn.Linear(in_f, out_f, bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype)


def split_model_(model: nn.Module, rank: int, tp_size: int, group=None, intermediate: int | None = None
                 ) -> nn.Module:
    """Turn a meta-device NVLM into rank ``rank``'s part (module docstring), in place; hooks come later
    (:func:`add_communication_`), after any quantisation swap. ``intermediate``: the (padded) MLP size to split."""
    config: NVLMConfig = model.config
    check_tp_config(config, tp_size, intermediate)
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if COLUMN_RE.match(name) or ROW_RE.match(name):
            full = intermediate if MLP_RE.match(name) else None
            setattr(model.get_submodule(parent_name), attr,
                    _narrow_linear(module, 0 if COLUMN_RE.match(name) else 1, tp_size, full))
        elif VOCAB_RE.match(name):
            setattr(model.get_submodule(parent_name), attr,
                    VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, rank, tp_size, group,
                                           device="meta", dtype=module.weight.dtype))
        elif name.endswith((".self_attn", ".cross_attn")) and hasattr(module, "num_kv_heads"):
            module.num_heads //= tp_size          # this rank's heads: q heads [r*H/N, ...), kv heads [r*Hkv/N, ...)
            module.num_kv_heads //= tp_size
    model.tp_rank, model.tp_size, model.tp_group = rank, tp_size, group
    model.tp_intermediate = intermediate or config.llm.intermediate_size
    return model


def add_communication_(model: nn.Module, tp_size: int, group=None) -> nn.Module:
    """Forward hooks: all-reduce after row-parallel layers, all-gather of the lm_head's vocab slices."""
    for name, module in model.named_modules():
        if ROW_RE.match(name):
            module.register_forward_hook(_all_reduce_hook(group))
        elif name == LM_HEAD:
            module.register_forward_hook(_all_gather_last_hook(group, tp_size))
    return model


@torch.no_grad()
def quantize_int8_row_parallel_(module: nn.Module, weight: torch.Tensor, group=None) -> None:
    """int8-quantise this rank's K-slice ``weight [N, K/tp]`` of a row-parallel layer with the scale of the WHOLE
    row: the row absmax is all-reduced (MAX) over the ranks first, then ``packing.quantize_int8``'s formula is
    applied, so the result is exactly the single-process one restricted to this K-slice. Collective: every rank
    calls it for the same layers in the same order."""
    from nvlm_kernels import packing

    n, k = module.out_features, module.in_features
    if tuple(weight.shape) != (n, k):
        raise ValueError(f"quantize_int8_row_parallel_: argument 'weight' must have shape ({n}, {k}), got "
                         f"{tuple(weight.shape)}")
    absmax = weight.float().abs().amax(dim=1)                                        # [N], this K-slice
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)                       # [N], whole row
    _, scale = packing.quantize_int8(absmax[:, None], scale_dtype=module.scale.dtype)  # same rounding of the scale
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    rows = max(1, (1 << 24) // max(k, 1))                                            # bound the fp32 temporaries
    for r0 in range(0, n, rows):
        wf = weight[r0:r0 + rows].float()
        q[r0:r0 + rows] = torch.round(wf / scale[r0:r0 + rows].float()[:, None]).clamp_(-127, 127).to(torch.int8)
    module._buffers["qweight"], module._buffers["scale"] = q, scale


# ----------------------------------------------------------------------------------------------------------------
# Reading slices
# ----------------------------------------------------------------------------------------------------------------
def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n


def read_slice(path: Path, header: dict, data_start: int, key: str, dim: int | None, rank: int,
               tp_size: int, padded: int | None = None) -> torch.Tensor:
    """Rank ``rank``'s part of ``key`` (all of it when ``dim`` is None), read with plain file reads into memory the
    tensor owns: only the bytes of the slice are read. ``padded``: size of ``dim`` after zero padding at its end
    (the slice is then ``padded / tp_size`` wide, zeros beyond the stored size)."""
    from nvlm.loading import _ST_DTYPES

    entry = header[key]
    dtype, shape = _ST_DTYPES[entry["dtype"]], list(entry["shape"])
    begin, end = entry["data_offsets"]
    item = dtype.itemsize
    if dim is not None:
        if padded is not None and padded != shape[dim]:
            return _read_padded_slice(path, data_start, key, entry, dtype, shape, dim, rank, tp_size, padded)
        if dim >= len(shape) or shape[dim] % tp_size:
            raise ValueError(f"checkpoint key {key!r} in {str(path)!r} has shape {shape}: dim {dim} does not split "
                             f"{tp_size} ways")
        if dim > 1 or (dim == 1 and len(shape) != 2):
            raise ValueError(f"checkpoint key {key!r}: only dims 0 and 1 of 2-D tensors are split, got {shape}")
    with open(path, "rb") as fh:
        if dim is None or dim == 0:
            rows = shape[0] if shape else 1
            row_bytes = (end - begin) // max(rows, 1)
            lo, n = (0, rows) if dim is None else (rank * rows // tp_size, rows // tp_size)
            out_shape = shape if dim is None else [n, *shape[1:]]
            buf = torch.empty(n * row_bytes if shape else end - begin, dtype=torch.uint8)
            fh.seek(data_start + begin + lo * row_bytes)
            if buf.numel() and fh.readinto(memoryview(buf.numpy())) != buf.numel():
                raise ValueError(f"checkpoint key {key!r} in {str(path)!r} cannot be read: file ends early")
            return buf.view(dtype).reshape(out_shape)
        rows, cols = shape
        width = cols // tp_size
        buf = torch.empty(rows * width * item, dtype=torch.uint8)               # [N, K/tp] as bytes
        view = memoryview(buf.numpy())
        step = width * item
        for r in range(rows):                                                    # one read per row of the slice
            fh.seek(data_start + begin + (r * cols + rank * width) * item)
            if fh.readinto(view[r * step:(r + 1) * step]) != step:
                raise ValueError(f"checkpoint key {key!r} in {str(path)!r} cannot be read: file ends early")
        return buf.view(dtype).reshape(rows, width)


def _read_padded_slice(path, data_start, key, entry, dtype, shape, dim, rank, tp_size, padded) -> torch.Tensor:
    """``read_slice`` of a 2-D float weight whose ``dim`` is zero-padded from ``shape[dim]`` to ``padded``."""
    if len(shape) != 2 or padded % tp_size or padded < shape[dim]:
        raise ValueError(f"checkpoint key {key!r}: cannot pad dim {dim} of {shape} to {padded} for {tp_size} ranks")
    begin = entry["data_offsets"][0]
    item = dtype.itemsize
    local = padded // tp_size
    lo = rank * local
    n = max(0, min(lo + local, shape[dim]) - lo)                                # real entries in this slice
    out = torch.zeros([local, shape[1]] if dim == 0 else [shape[0], local], dtype=dtype)
    raw = out.view(torch.uint8).view(-1)                                         # the same memory as bytes
    view = memoryview(raw.numpy())
    with open(path, "rb") as fh:
        if dim == 0 and n:
            fh.seek(data_start + begin + lo * shape[1] * item)
            want = n * shape[1] * item
            if fh.readinto(view[:want]) != want:
                raise ValueError(f"checkpoint key {key!r} in {str(path)!r} cannot be read: file ends early")
        elif n:
            step = local * item
            for r in range(shape[0]):
                fh.seek(data_start + begin + (r * shape[1] + lo) * item)
                if fh.readinto(view[r * step:r * step + n * item]) != n * item:
                    raise ValueError(f"checkpoint key {key!r} in {str(path)!r} cannot be read: file ends early")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------
def load_pretrained_tp(path: str | os.PathLike, tp_size: int, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu", quantization=None, progress: bool = True, group=None):
    """Rank ``dist.get_rank(group)``'s part of the checkpoint folder ``path`` as an ``NVLM`` whose forward returns
    the full logits on every rank (module docstring). Needs an initialised process group (``group`` or the default
    one) of exactly ``tp_size`` ranks; every rank must call it with the same arguments."""
    from nvlm import loading
    from nvlm.model import NVLM

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("from_pretrained(tp_size=...): torch.distributed is not initialised; run under "
                         "`torchrun --nproc-per-node N` (nvlm.tp.init_tp() initialises from its environment)")
    world = dist.get_world_size(group)
    if world != tp_size:
        raise ValueError(f"from_pretrained: argument 'tp_size' is {tp_size} but the process group has {world} ranks")
    rank = dist.get_rank(group)
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} " + ("is a file, not a folder" if folder.exists()
                                                                   else "does not exist"))
    device = loading._check_device(rank_device(device))
    if not (folder / loading.CONFIG_NAME).is_file():
        raise ValueError(f"{str(folder)!r} is not an NVLM checkpoint folder: it has no {loading.CONFIG_NAME}")
    config = NVLMConfig.from_json(folder / loading.CONFIG_NAME)
    check_tp_config(config, tp_size)
    token_id = loading._tokenizer_context_id(folder)
    if token_id is not None:
        config.img_context_token_id = token_id
    dtype = dtype or config.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"from_pretrained: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")

    # 1. The unsplit model on meta: the checkpoint's keys/shapes and the quantisation choice of one process.
    weight_map, listed_in = loading.read_weight_map(folder)
    with torch.device("meta"):
        full = NVLM(config)
    stored_quant = config.extra.get("quantization_config")
    if stored_quant is not None and quantization is not None:
        raise ValueError(f"checkpoint {str(folder)!r} is already quantised ({stored_quant.get('method')!r} in "
                         f"config.json); load it without 'quantization'")
    qconfig, quant_cls, selected, intermediate = None, None, set(), None
    if quantization is not None or stored_quant is not None:
        import nvlm.quant as quant

        qconfig = quant.resolve_config(stored_quant if stored_quant is not None else quantization)
        if not isinstance(qconfig, (quant.Int8WeightOnly, quant.Int4WeightOnly)):
            raise ValueError(f"tensor parallelism supports Int8WeightOnly / Int4WeightOnly, got "
                             f"{type(qconfig).__name__}")
        quant_cls = quant.QuantLinear
        float_full = full
        with torch.device("meta"):
            full = NVLM(config)
        quant.quantize_(full, qconfig)
        selected = {n for n, m in full.named_modules() if isinstance(m, quant.QuantLinear)}
        if stored_quant is None:
            full = float_full                     # the file holds float weights: check against those
        down = [n for n in selected if MLP_RE.match(n) and ROW_RE.match(n)]
        if isinstance(qconfig, quant.Int4WeightOnly) and down and stored_quant is None:
            intermediate = mlp_intermediate_padded(config.llm.intermediate_size, tp_size, qconfig.group_size)
        if isinstance(qconfig, quant.Int4WeightOnly):
            check_int4_groups(float_full, tp_size, qconfig.group_size, selected, skip_mlp=intermediate is not None)
    expected_meta = dict(full.state_dict())
    unknown = [k for k in weight_map if k not in expected_meta]
    if unknown:
        raise ValueError(f"checkpoint key {unknown[0]!r} (in {weight_map[unknown[0]]!r}) is not a parameter of "
                         f"NVLM-{config.arch}")
    missing = [k for k in expected_meta if k not in weight_map]
    if missing:
        raise ValueError(f"checkpoint {str(folder / listed_in)!r} lacks key {missing[0]!r}")
    del full

    # 2. This rank's model: narrowed Linears, vocab-parallel embedding, then the same quantisation choice.
    with torch.device("meta"):
        model = NVLM(config)
    split_model_(model, rank, tp_size, group, intermediate)
    if qconfig is not None:
        quant.quantize_(model, qconfig, filter_fn=lambda m, fqn: fqn in selected)
    add_communication_(model, tp_size, group)

    # 3. Headers first (shape and dtype of every key), then this rank's slices, one tensor at a time.
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        with loading._open(folder / name) as f:   # safetensors validates the header (truncated/corrupt files)
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise ValueError(f"checkpoint shard {str(folder / name)!r} lacks key {key!r} that {listed_in} "
                                     f"maps to it")
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != tuple(expected_meta[key].shape):
                    raise ValueError(f"checkpoint key {key!r} in {str(folder / name)!r} has shape "
                                     f"{list(sl.get_shape())}, expected {list(expected_meta[key].shape)}")
                found = loading._ST_DTYPES.get(sl.get_dtype())
                want_float = expected_meta[key].is_floating_point()
                if found is None or found.is_floating_point != want_float \
                        or (not want_float and found != expected_meta[key].dtype):
                    raise ValueError(f"checkpoint key {key!r} in {str(folder / name)!r} has dtype {sl.get_dtype()}, "
                                     f"expected {'a floating-point' if want_float else expected_meta[key].dtype} "
                                     f"dtype")
    for name in sorted(by_file):
        header, data_start = _read_header(folder / name)
        for key in sorted(by_file[name], key=lambda k: header[k]["data_offsets"][0]):
            padded = intermediate if intermediate is not None and MLP_RE.match(key.rpartition(".")[0]) else None
            tensor = read_slice(folder / name, header, data_start, key, shard_dim(key), rank, tp_size, padded)
            tensor = tensor.to(device=device, dtype=loading._target_dtype(key, tensor, dtype, stored_quant))
            module_name, _, leaf = key.rpartition(".")
            if stored_quant is None and qconfig is not None and qconfig.bits == 8 and leaf == "weight" \
                    and module_name in selected and ROW_RE.match(module_name):
                quantize_int8_row_parallel_(model.get_submodule(module_name), tensor, group)
            else:
                loading._assign_tensor(model, key, tensor, quant_cls)
            del tensor
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"checkpoint {str(folder)!r} left {still_meta[0]!r} unset on rank {rank}")
    model.eval()
    model.source_path = folder
    model.processor = loading._load_processor(folder)
    return model
