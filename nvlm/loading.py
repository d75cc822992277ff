"""Streaming load and atomic save of NVLM checkpoints in the published layout (design.md "Loading").

Load (``load_pretrained``):

1. ``config.json`` -> ``NVLMConfig``; ``tokenizer.json`` (when present) gives ``img_context_token_id`` by the name
   ``<|vision_pad|>``.
2. The model is built on the meta device (no memory); optionally ``nvlm.quant.quantize_`` swaps its Linears.
3. ``model.safetensors.index.json`` (or a single ``model.safetensors``) is checked against the model's keys before
   any tensor is read: an unknown or missing key, a missing shard, a pickle file (.bin/.pt/...) raises a
   ``ValueError`` naming key and file.
4. Every shard's header is validated with ``safetensors.safe_open`` (truncated or corrupt files fail here) and
   every key's shape and dtype checked before any data is read. Then the shards are read one at a time, one
   tensor at a time (its dtype from the file header, not assumed) into memory the tensor owns, cast to the
   requested dtype, moved to the device and assigned by ``_assign_tensor``. The float weight of a quantised
   linear is instead read in row blocks of ~1 MiB (``_RowBlocks``) and quantised block by block
   (``QuantLinear.set_weight_from_row_blocks``), and the heap pages its temporaries used are handed back
   (``_release_freed_heap``). Peak host memory is the finished model plus about one unquantised tensor (and a few
   MiB): measured by ``bench/bench_load_rss.py`` on a 1.4 GB bf16 checkpoint, peak RSS over the post-import
   baseline is 1.01x (bf16), 1.04x (int8) and 1.07x (int4) the finished model. A tqdm bar counts bytes.

NVLM-X / NVLM-H checkpoints (our own layout, documented in ``nvlm.xattn``) load and save the same way:
``config.json``'s ``arch`` selects the architecture, and the key check above covers the cross-attention blocks.

Failures: the device is checked before any file is opened (an absent GPU is a ``ValueError``); running out of
memory while streaming re-raises ``torch.OutOfMemoryError`` with ``nvlm.plan``'s advice (GPUs needed per format,
which quantisation fits); a quantised checkpoint whose ``quantization_config`` is unusable names config.json.

Save (``save_pretrained``): sharded safetensors + index + config.json (+ the tokenizer files of the folder the
model came from) into a hidden temporary folder next to the target, renamed into place only when complete, so an
interrupted save never leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from nvlm.config import NVLMConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IMAGE_CONTEXT_TOKEN = "<|vision_pad|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint discovery
# ----------------------------------------------------------------------------------------------------------------
def _refuse_pickle(name: str, key: str | None = None) -> None:
    if name.endswith(PICKLE_SUFFIXES):
        where = f" (key {key!r})" if key else ""
        raise ValueError(f"checkpoint file {name!r}{where} is a pickle-based format; only safetensors files are "
                         f"loaded (pickles can run code). Convert it to safetensors first")


def read_weight_map(folder: Path) -> tuple[dict[str, str], str]:
    """``{key: shard file name}`` and the name of the file that listed them (index or single file)."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"checkpoint index {str(index)!r} is not valid JSON: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"checkpoint index {str(index)!r} has no 'weight_map' object")
        for key, name in weight_map.items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"checkpoint index {str(index)!r}: key {key!r} maps to an invalid file {name!r}")
            _refuse_pickle(name, key)
            if not name.endswith(".safetensors"):
                raise ValueError(f"checkpoint index {str(index)!r}: key {key!r} maps to {name!r}, which is not a "
                                 f".safetensors file")
        missing = sorted({n for n in weight_map.values() if not (folder / n).is_file()})
        if missing:
            keys = [k for k, n in weight_map.items() if n == missing[0]]
            raise ValueError(f"checkpoint shard {str(folder / missing[0])!r} is missing (listed in {INDEX_NAME} for "
                             f"{len(keys)} keys, e.g. {keys[0]!r})" + (f"; also missing: {missing[1:]}"
                                                                        if len(missing) > 1 else ""))
        return dict(weight_map), INDEX_NAME
    single = folder / SINGLE_NAME
    if single.is_file():
        with _open(single) as f:
            return {k: SINGLE_NAME for k in f.keys()}, SINGLE_NAME
    for p in sorted(folder.iterdir()):
        _refuse_pickle(p.name)
    raise ValueError(f"checkpoint folder {str(folder)!r} has neither {INDEX_NAME} nor {SINGLE_NAME}")


class _RowBlocks:
    """A 2-D tensor of an open safetensors file, read on demand in blocks of whole rows (for weights quantised on
    arrival: the float weight is never held whole). Valid only until the reader moves to the next key."""

    def __init__(self, fh, offset: int, shape: list[int], dtype: torch.dtype, where: str):
        self.fh, self.offset, self.shape, self.dtype, self.where = fh, offset, shape, dtype, where

    def blocks(self, max_bytes: int = 1 << 20):
        """Yield ``(r0, rows [r, K])`` (tensors owning their memory) of at most ~``max_bytes`` each, in order."""
        n, k = self.shape
        row_bytes = k * self.dtype.itemsize
        rows = max(1, max_bytes // max(row_bytes, 1))
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            buf = torch.empty(r * row_bytes, dtype=torch.uint8)
            self.fh.seek(self.offset + r0 * row_bytes)
            if buf.numel() and self.fh.readinto(memoryview(buf.numpy())) != buf.numel():
                raise ValueError(f"checkpoint {self.where} cannot be read: file ends early")
            yield r0, buf.view(self.dtype).reshape(r, k)


def _read_tensors(path: Path, keys: list[str], by_rows=frozenset()):
    """Yield ``(key, tensor)`` for ``keys`` of one (already validated) safetensors file, one tensor at a time, in
    file order, each read with plain file reads into memory it owns. Keys in ``by_rows`` (2-D) yield a
    :class:`_RowBlocks` instead, to be consumed before the next item.

    Not ``safe_open(...).get_tensor``: that returns tensors backed by a private mmap of the file, so a loaded model
    would stay tied to the file (untouched pages read lazily; rewriting the file in place would change or crash the
    model) and every page read would stay mapped, counting against memory, until the shard is closed.
    """
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):
            entry = header[key]
            begin, end = entry["data_offsets"]
            if key in by_rows:
                yield key, _RowBlocks(fh, data_start + begin, entry["shape"], _ST_DTYPES[entry["dtype"]],
                                      f"key {key!r} in {str(path)!r}")
                continue
            buf = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(data_start + begin)
            if end > begin and fh.readinto(memoryview(buf.numpy())) != end - begin:
                raise ValueError(f"checkpoint key {key!r} in {str(path)!r} cannot be read: file ends early")
            yield key, buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError: truncated file, bad header, ...
        raise ValueError(f"checkpoint shard {str(path)!r} cannot be read as safetensors: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Assignment (the quantise-while-streaming hook)
# ----------------------------------------------------------------------------------------------------------------
def _assign_tensor(model: nn.Module, key: str, tensor: torch.Tensor, quant_linear_cls=None) -> bool:
    """Put ``tensor`` (already cast and on its device) at ``key`` of a meta-device ``model``.

    If the owning module is a quantised linear (``nvlm.quant.QuantLinear``), a float ``weight`` is quantised on
    arrival through ``module.set_weight_from_float(weight)`` instead of being stored (then returns True: the
    caller's ``tensor`` is garbage); its ``bias`` (if any) is a plain tensor, assigned like any other parameter.
    """
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if quant_linear_cls is not None and isinstance(module, quant_linear_cls) and attr == "weight" \
            and "weight" not in module._parameters and "weight" not in module._buffers:
        module.set_weight_from_float(tensor)
        return True
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise ValueError(f"model has no parameter or buffer {key!r}")
    return False


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim    # glibc; absent elsewhere (musl, macOS)
    except (OSError, AttributeError):
        return None


def _release_freed_heap() -> None:
    """Give the heap pages freed by quantising one weight back to the OS (glibc ``malloc_trim(0)``).

    Why: once malloc has freed one large mmap'ed block (a bf16 weight read from the file), glibc raises its mmap
    threshold to that size, so the next weights and the quantisers' fp32 temporaries come from the heap, between
    the long-lived packed buffers, and the holes they leave are not returned to the OS on ``free``. Measured with
    ``bench/bench_load_rss.py`` (1.4 GB bf16 checkpoint, int4): peak RSS 2.6x the final model without this.
    ``malloc_trim`` releases whole free pages anywhere in the heap (``MADV_DONTNEED``) without changing malloc's
    settings for the rest of the process.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ----------------------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------------------
def _tokenizer_context_id(folder: Path) -> int | None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"tokenizer file {str(path)!r} cannot be read: {e}") from None
    token_id = tok.token_to_id(IMAGE_CONTEXT_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer file {str(path)!r} has no {IMAGE_CONTEXT_TOKEN!r} token (the image-context "
                         f"token of NVLM-D)")
    return token_id


def _load_processor(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from nvlm.processor import NVLMProcessor
    except ImportError:
        return None
    return NVLMProcessor.from_pretrained(folder)


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    quantization=None, progress: bool = True):
    """Stream the checkpoint folder ``path`` into a new ``NVLM`` (see module docstring).

    ``dtype``: dtype of the floating-point weights (default: the config's ``torch_dtype``). ``quantization``: a
    config for ``nvlm.quant.quantize_`` (e.g. ``Int4WeightOnly()``), applied to the meta model before streaming.
    """
    from nvlm.model import NVLM

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} " + ("is a file, not a folder" if folder.exists()
                                                                   else "does not exist"))
    device = _check_device(device)     # an absent GPU fails here, before any file is opened
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{str(folder)!r} is not an NVLM checkpoint folder: it has no {CONFIG_NAME}")
    config = NVLMConfig.from_json(folder / CONFIG_NAME)
    token_id = _tokenizer_context_id(folder)
    if token_id is not None:
        config.img_context_token_id = token_id
    dtype = dtype or config.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"from_pretrained: argument 'dtype' must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)

    weight_map, listed_in = read_weight_map(folder)
    with torch.device("meta"):
        model = NVLM(config)
    stored_quant = config.extra.get("quantization_config")     # a checkpoint saved after quantisation
    if stored_quant is not None and quantization is not None:
        raise ValueError(f"checkpoint {str(folder)!r} is already quantised ({stored_quant.get('method')!r} in "
                         f"config.json); load it without 'quantization'")
    quant_cls = None
    if quantization is not None or stored_quant is not None:
        try:
            import nvlm.quant as quant
        except ImportError:
            raise NotImplementedError("quantised loading needs nvlm.quant, which is not available yet") from None
        quant_cls = quant.QuantLinear
    if stored_quant is not None:       # stored keys are the quantised layout: qweight, scale(s), zeros, bias
        try:
            if not isinstance(stored_quant, dict):
                raise ValueError(f"it must be a JSON object, got {type(stored_quant).__name__}")
            quant.quantize_(model, stored_quant)
        except ValueError as e:        # unknown method, unsupported group size, ...
            raise ValueError(f"checkpoint {str(folder / CONFIG_NAME)!r} has an unusable 'quantization_config': "
                             f"{e}") from None
    expected_meta = dict(model.state_dict())
    expected = {k: tuple(v.shape) for k, v in expected_meta.items()}
    unknown = [k for k in weight_map if k not in expected]
    if unknown:
        raise ValueError(f"checkpoint key {unknown[0]!r} (in {weight_map[unknown[0]]!r}) is not a parameter of "
                         f"NVLM-{config.arch}" + (f"; {len(unknown) - 1} more unknown keys" if len(unknown) > 1
                                                  else ""))
    missing = [k for k in expected if k not in weight_map]
    if missing:
        raise ValueError(f"checkpoint {str(folder / listed_in)!r} lacks key {missing[0]!r} (expected shape "
                         f"{list(expected[missing[0]])})" + (f"; {len(missing) - 1} more keys missing"
                                                              if len(missing) > 1 else ""))

    after_load = None
    if quantization is not None:
        quantization = quant.resolve_config(quantization)
        if isinstance(quantization, (quant.BnbNF4, quant.BnbInt8)):
            # bitsandbytes quantises materialised weights (on .to(device)): load the float model, then swap
            # (peak memory is the float model here, unlike our own formats, which are quantised while streaming)
            after_load = quantization
        elif quantization.rounding == "gptq":
            # GPTQ needs every layer's calibration activations, which a weight-by-weight stream cannot give
            raise ValueError("from_pretrained: argument 'quantization' has rounding='gptq', which needs calibration "
                             "inputs: load the float model, then nvlm.quant.quantize_(model, config, "
                             "calibration=fn); rounding 'rtn' or 'mse' quantise while streaming")
        else:                          # float checkpoint, quantised on arrival (_assign_tensor)
            quant.quantize_(model, quantization)

    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    total = 0
    headers: dict[str, dict[str, tuple[list[int], str]]] = {}
    for name, keys in by_file.items():  # headers only: validate every shape before reading any data
        with _open(folder / name) as f:
            present = set(f.keys())
            extra = sorted(present - set(keys))
            if extra:
                raise ValueError(f"checkpoint shard {str(folder / name)!r} holds key {extra[0]!r} that "
                                 f"{listed_in} does not map to it")
            headers[name] = {}
            for key in keys:
                if key not in present:
                    raise ValueError(f"checkpoint shard {str(folder / name)!r} lacks key {key!r} that {listed_in} "
                                     f"maps to it")
                sl = f.get_slice(key)
                shape, st_dtype = list(sl.get_shape()), sl.get_dtype()
                if tuple(shape) != expected[key]:
                    raise ValueError(f"checkpoint key {key!r} in {str(folder / name)!r} has shape {shape}, "
                                     f"expected {list(expected[key])}")
                want_float = expected_meta[key].is_floating_point()
                found = _ST_DTYPES.get(st_dtype)
                # float weights may come in any float dtype (cast on load); packed integers must match exactly
                # (int8 read as uint8 would silently change every weight)
                if found is None or found.is_floating_point != want_float \
                        or (not want_float and found != expected_meta[key].dtype):
                    raise ValueError(f"checkpoint key {key!r} in {str(folder / name)!r} has dtype {st_dtype}, "
                                     f"expected {'a floating-point' if want_float else expected_meta[key].dtype} "
                                     f"dtype")
                headers[name][key] = (shape, st_dtype)
                numel = 1
                for s in shape:
                    numel *= s
                total += numel * _ST_DTYPES[st_dtype].itemsize

    # float weights of quantised Linears: read in row blocks and quantised block by block (a whole bf16 weight
    # would add up to ~0.5 GB to the peak for NVLM-D-72B's MLP, and the fp32 temporaries more)
    by_rows = set()
    if quant_cls is not None and stored_quant is None:
        for key in weight_map:
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            if attr == "weight" and isinstance(module, quant_cls) and len(expected[key]) == 2:
                by_rows.add(key)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", disable=not progress)
    try:
        with bar:
            for name in sorted(by_file):
                for key, tensor in _read_tensors(folder / name, by_file[name], by_rows):
                    if isinstance(tensor, _RowBlocks):  # a float weight quantised on arrival, a few MiB at a time
                        owner = model.get_submodule(key.rpartition(".")[0])
                        owner.set_weight_from_row_blocks(
                            ((r0, rows.to(device=device, dtype=dtype)) for r0, rows in tensor.blocks()), device)
                        _release_freed_heap()
                        bar.update(tensor.shape[0] * tensor.shape[1] * tensor.dtype.itemsize)
                        continue
                    nbytes = tensor.numel() * tensor.element_size()
                    tensor = tensor.to(device=device, dtype=_target_dtype(key, tensor, dtype, stored_quant))
                    quantised = _assign_tensor(model, key, tensor, quant_cls)
                    del tensor
                    if quantised and device.type == "cpu":
                        _release_freed_heap()
                    bar.update(nbytes)
    except torch.OutOfMemoryError as e:  # the bare CUDA message says nothing about what would fit: ask the planner
        model = None                     # drop the half-loaded weights before planning
        raise torch.OutOfMemoryError(_oom_advice(folder, config, stored_quant or quantization, device, e)) from e
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"checkpoint {str(folder)!r} left {still_meta[0]!r} unset")
    if after_load is not None:
        quant.quantize_(model, after_load)
    model.eval()
    model.source_path = folder
    model.processor = _load_processor(folder)
    return model


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` if this machine does not have it (checked before loading)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"from_pretrained: argument 'device' {device!r} is not a device: {e}") from None
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise ValueError(f"from_pretrained: argument 'device' is {str(dev)!r} but this machine has {count} "
                             f"usable CUDA device(s); nothing was loaded")
        return dev
    try:
        torch.empty(0, device=dev)
    except Exception as e:
        raise ValueError(f"from_pretrained: argument 'device' {str(dev)!r} is not available here: {e}") from None
    return dev


_PLAN_QUANT = {"int8": "int8", "int8_weight_only": "int8", "bnb-int8": "int8", "bnb_int8": "int8",
               "int4": "int4", "int4_weight_only": "int4", "bnb-nf4": "int4", "bnb_nf4": "int4"}


def _oom_advice(folder: Path, config: NVLMConfig, quantization, device: torch.device, error: Exception) -> str:
    """The message for an out-of-memory error while loading: what the planner (``nvlm.plan``) says would fit."""
    if isinstance(quantization, dict):
        method = quantization.get("method")
    else:
        method = quantization if isinstance(quantization, str) else getattr(quantization, "method", None)
    current = _PLAN_QUANT.get(method, "bf16")
    gpu = "h100-80gb"
    try:
        from nvlm.plan import GPUS, plan

        if device.type == "cuda" and torch.cuda.is_available():   # the listed GPU closest in memory size
            total = torch.cuda.get_device_properties(device).total_memory
            gpu = min(GPUS, key=lambda g: abs(GPUS[g] - total))
        plans = {q: plan(config, quant=q, gpu=gpu, context=config.llm.max_position_embeddings)
                 for q in ("bf16", "int8", "int4")}
    except Exception as e:  # the advice must never hide the real error
        return f"out of memory while loading {str(folder)!r} onto {device} ({current}): {error} (planner failed: {e})"
    need = {q: (f"{p.gpus_needed} GPU" + ("s" if p.gpus_needed != 1 else "")) if p.gpus_needed else "does not fit"
            for q, p in plans.items()}
    one = [q for q in ("bf16", "int8", "int4") if plans[q].gpus_needed == 1]
    best = min((q for q in plans if plans[q].gpus_needed), key=lambda q: plans[q].gpus_needed, default=current)
    if one and one[0] != current:
        best = one[0]
        advice = f"load with quantization={best!r} (CLI: --quant {best}) to fit one {gpu}"
    elif one:
        advice = f"the planner says {current} fits one {gpu}: free GPU memory used by other processes or tensors"
    elif plans[best].gpus_needed:
        advice = f"use {plans[best].gpus_needed} x {gpu} (tensor parallel) with {best}"
    else:
        advice = f"no tensor-parallel group of {gpu} holds it"
    weights = ", ".join(f"{q} {plans[q].weights_bytes / 1e9:.1f} GB weights -> {need[q]}" for q in plans)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"out of GPU memory while loading {str(folder)!r} onto {device} as {current} ({first}). Planner for "
            f"{gpu}, {config.llm.max_position_embeddings}-token context: {weights}. Advice: {advice}; details: "
            f"`nvlm plan --model {folder} --quant {best} --gpu {gpu}`")


def _target_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype, stored_quant) -> torch.dtype:
    """Float tensors take the requested dtype, except the scales of a stored quantised layer (their dtype is part
    of the format); integer tensors (packed weights, zero points) keep theirs."""
    if not tensor.is_floating_point():
        return tensor.dtype
    if stored_quant is not None and key.rpartition(".")[2] in ("scale", "scales"):
        return tensor.dtype
    return dtype


# ----------------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------------
def _plan_shards(sizes: list[int], max_shard_bytes: int | None, num_shards: int | None) -> list[int]:
    """Shard index of each tensor, in order: by a byte budget, or ``num_shards`` shards balanced by bytes."""
    if num_shards is not None:
        total = max(sum(sizes), 1)
        out, start = [], 0
        for s in sizes:
            out.append(min(num_shards - 1, start * num_shards // total))
            start += s
    else:
        out, current, shard = [], 0, 0
        for s in sizes:
            if current and current + s > max_shard_bytes:
                shard, current = shard + 1, 0
            out.append(shard)
            current += s
    used = sorted(set(out))  # renumber so no shard is empty
    return [used.index(i) for i in out]


def save_pretrained(model, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
                    num_shards: int | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as ``model-0000i-of-0000n.safetensors`` + index + config.json (+ tokenizer files).

    ``num_shards`` (if given) overrides ``max_shard_bytes``. The folder appears only once complete; an existing
    ``path`` is replaced only with ``overwrite=True``.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        if not target.is_dir() or any(target.iterdir()):
            raise ValueError(f"save_pretrained: {str(target)!r} already exists (pass overwrite=True to replace it)")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"save_pretrained: argument 'num_shards' must be >= 1, got {num_shards}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = model.state_dict()
        keys = list(state)
        sizes = [state[k].numel() * state[k].element_size() for k in keys]
        plan = _plan_shards(sizes, max_shard_bytes, num_shards)
        n = max(plan) + 1
        weight_map = {}
        for shard in range(n):
            name = f"model-{shard + 1:05d}-of-{n:05d}.safetensors"
            tensors = {k: state[k].detach().to("cpu").contiguous() for k, p in zip(keys, plan) if p == shard}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in tensors})
            del tensors
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = model.config.to_dict()
        config["torch_dtype"] = _dtype_name(state)
        if getattr(model, "quantization_config", None):  # set by nvlm.quant.quantize_; reload needs no flags
            config["quantization_config"] = model.quantization_config
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        source = getattr(model, "source_path", None)
        if source is not None:
            for fname in TOKENIZER_FILES:
                if (Path(source) / fname).is_file():
                    shutil.copy2(Path(source) / fname, tmp / fname)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _dtype_name(state: dict) -> str:
    """Dtype of the floating-point weights (most bytes), as config.json spells it."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    best = max(counts, key=counts.get) if counts else torch.bfloat16
    return {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}.get(best, "bfloat16")
