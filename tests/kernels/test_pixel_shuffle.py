"""pixel_shuffle / pixel_shuffle_layernorm: every backend against the InternVL view/permute reference.

* compiled CPU kernel (csrc/cpu/pixel_shuffle.cpp) at NVLM's real shape [7, 1024, 3200] and odd shapes, both
  ps_versions, fp32/bf16/fp16, at each SIMD level (NVLM_KERNELS_CPU_ISA=avx512|avx2|scalar, read on every call);
* Triton kernels under TRITON_INTERPRET=1 (small shapes, fp32/fp16: the interpreter mishandles bf16);
* CUDA kernels: registered for the CUDA dispatch key (run when a GPU is present);
* non-contiguous inputs, argument errors (ValueError naming the argument), opcheck, torch.compile(fullgraph=True).

The shuffle is a permutation: results must be bit-identical. The fused LayerNorm is judged against float64 truth:
kernel error <= 2 x (error of the same PyTorch computation, F.layer_norm in the input dtype) + a tiny eps.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels
from nvlm_kernels import _ext, dispatch
from nvlm_kernels.pixel_shuffle import (
    gate_specs,
    pixel_shuffle,
    pixel_shuffle_layernorm,
    pixel_shuffle_layernorm_ref,
    pixel_shuffle_ref,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()
HAS_CPU_KERNEL = _ext.has_kernel("pixel_shuffle", "CPU") and _ext.has_kernel("pixel_shuffle_layernorm", "CPU")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason=f"compiled CPU kernels missing ({_ext.LOAD_ERROR})")
needs_interpreter = pytest.mark.skipif(not (dispatch.triton_available() and dispatch.triton_interpreted()),
                                       reason="needs triton with TRITON_INTERPRET=1 (no GPU)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

EPS = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
REAL = (7, 1024, 3200)  # NVLM-D-72B: 6 tiles + thumbnail, 32x32 patches, 3200 channels -> rows of 12800
# (T, N, C): N=4 (s=2), N=16, T=1, 13 tiles, C=1, C=3, C=17 (scalar tail), C=33 and C=80 (vector loop + tail /
# no 4x-unrolled part), N=36 (s=6)
ODD = [(3, 4, 8), (2, 16, 24), (1, 64, 32), (13, 16, 3), (2, 16, 1), (3, 64, 17), (2, 16, 33), (1, 36, 80)]


def _inputs(t, n, c, dtype, device="cpu", offset=0.5):
    """x with a non-zero mean (so the two-pass variance matters), LN weight/bias in the model's dtype."""
    x = (torch.randn(t, n, c, device=device) + offset).to(dtype)
    w = (1 + 0.1 * torch.randn(4 * c, device=device)).to(dtype)
    b = (0.1 * torch.randn(4 * c, device=device)).to(dtype)
    return x, w, b


def _check_ln(out, x, w, b, eps, version):
    """Kernel-vs-float64 error <= 2 x (F.layer_norm in x.dtype)-vs-float64 error + EPS[dtype]."""
    y = pixel_shuffle_ref(x.cpu(), version)
    truth = F.layer_norm(y.double(), (y.shape[-1],), w.cpu().double(), b.cpu().double(), eps)
    lowp = F.layer_norm(y, (y.shape[-1],), w.cpu().to(x.dtype), b.cpu().to(x.dtype), eps)
    err_kernel = (out.cpu().double() - truth).abs().max().item()
    err_torch = (lowp.double() - truth).abs().max().item()
    assert out.shape == y.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()
    assert err_kernel <= 2 * err_torch + EPS[x.dtype], (err_kernel, err_torch)
    return err_kernel, err_torch


def _run(backend, fn, *args, **kw):
    with nvlm_kernels.force_backend(backend):
        return fn(*args, **kw)


ISAS = ["avx512", "avx512-nobf16", "avx2", "scalar"]


@pytest.fixture
def isa(request, monkeypatch):
    """Cap the CPU kernels' SIMD level through NVLM_KERNELS_CPU_ISA (the extension reads it on every call).

    ``avx512-nobf16``: AVX-512 with NVLM_KERNELS_CPU_BF16=0, i.e. without the AVX512_BF16 conversion instruction
    (the exact integer rounding the AVX-512 bf16 store uses on CPUs that lack it).
    """
    param = request.param
    level = param.removesuffix("-nobf16")
    monkeypatch.delenv("NVLM_KERNELS_CPU_ISA", raising=False)
    monkeypatch.delenv("NVLM_KERNELS_CPU_STREAM", raising=False)
    monkeypatch.setenv("NVLM_KERNELS_CPU_BF16", "0" if param.endswith("-nobf16") else "1")
    best = _ext.cpu_capability()
    order = ["scalar", "avx2", "avx512"]
    if best in order and order.index(level) > order.index(best):
        pytest.skip(f"this CPU tops out at {best}")
    monkeypatch.setenv("NVLM_KERNELS_CPU_ISA", level)
    assert _ext.cpu_capability() == level
    return param


# ----------------------------------------------------------------------------------------------------------------
# Reference sanity: the closed form of nvlm_spec.md §3, independent of the view/permute code
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_reference_matches_closed_form(version):
    t, s, c = 2, 6, 3
    x = torch.randn(t, s * s, c)
    grid = x.view(t, s, s, c)
    out = pixel_shuffle_ref(x, version)
    h = s // 2
    for i in range(h):
        for j in range(h):
            token = h * i + j if version == "v2" else h * j + i
            want = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                              grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
            assert torch.equal(out[:, token], want)


# ----------------------------------------------------------------------------------------------------------------
# Compiled CPU kernels
# ----------------------------------------------------------------------------------------------------------------
@needs_cpu_kernel
def test_cpu_kernel_is_chosen_automatically():
    x, w, b = _inputs(1, 16, 8, torch.float32)
    before = dict(dispatch.usage)
    pixel_shuffle(x)
    pixel_shuffle_layernorm(x, w, b)
    assert dispatch.usage[("pixel_shuffle", "cpu")] == before.get(("pixel_shuffle", "cpu"), 0) + 1
    assert dispatch.usage[("pixel_shuffle_layernorm", "cpu")] == before.get(("pixel_shuffle_layernorm", "cpu"), 0) + 1


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_real_shape(dtype):
    x, w, b = _inputs(*REAL, dtype)
    for version in ("v1", "v2"):
        ref = pixel_shuffle_ref(x, version)
        assert torch.equal(_run("cpu", pixel_shuffle, x, version=version), ref)
        out = _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)
        _check_ln(out, x, w, b, 1e-5, version)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "x".join(map(str, s)))
def test_cpu_odd_shapes(shape, dtype):
    x, w, b = _inputs(*shape, dtype)
    for version in ("v1", "v2"):
        assert torch.equal(_run("cpu", pixel_shuffle, x, version=version), pixel_shuffle_ref(x, version))
        out = _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)
        _check_ln(out, x, w, b, 1e-5, version)


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_each_isa(isa, dtype):
    # [2, 1024, 512]: a 2-4 MiB output (normal stores); the real shape in bf16: 46 MB, huge pages and (where the OS
    # reports a last-level cache below that, as here: 32 MiB) streaming stores; odd shapes for the vector tails.
    shapes = [(2, 1024, 512)] + ([REAL] if dtype == torch.bfloat16 else []) + ODD[3:]
    for shape in shapes:
        x, w, b = _inputs(*shape, dtype)
        for version in ("v1", "v2"):
            assert torch.equal(_run("cpu", pixel_shuffle, x, version=version), pixel_shuffle_ref(x, version)), shape
            out = _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)
            _check_ln(out, x, w, b, 1e-5, version)


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_cpu_large_mean_and_specials(isa):
    """|mean| >> std (a one-pass E[x^2]-E[x]^2 variance would cancel) and bf16 rounding of inf/NaN/ties."""
    x = (1000 + 0.01 * torch.randn(2, 16, 40)).float()
    w, b = torch.ones(160), torch.zeros(160)
    _check_ln(_run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5), x, w, b, 1e-5, "v2")
    # Nearly constant bf16/fp16 rows far from 0 (std/mean < 1e-3, where plain sums of x and x^2 cancel): 2^16 with
    # 2% of the values 2^16+512 (bf16), 1024 with 2% of them 1025 (fp16), all exact; C=64: the vector loops sum.
    for dtype, base, step in ((torch.bfloat16, 65536, 512), (torch.float16, 1024, 1)):
        x = (base + step * (torch.rand(2, 16, 64, generator=torch.Generator().manual_seed(3)) < 0.02)).to(dtype)
        ones, zeros = torch.ones(256, dtype=dtype), torch.zeros(256, dtype=dtype)
        _check_ln(_run("cpu", pixel_shuffle_layernorm, x, ones, zeros, 1e-5), x, ones, zeros, 1e-5, "v2")
    # NaN in one row: that row is NaN, the others are untouched (bf16 store keeps NaN a NaN, not an infinity).
    x = torch.randn(1, 16, 40).to(torch.bfloat16)
    x[0, 0, 3] = float("nan")
    out = _run("cpu", pixel_shuffle_layernorm, x, w.bfloat16(), b.bfloat16(), 1e-5)
    assert torch.isnan(out[0, 0]).all() and not torch.isinf(out).any()
    assert torch.equal(out[0, 1:], pixel_shuffle_layernorm_ref(x, w, b, 1e-5)[0, 1:])


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("offset", [30.0, 3000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_outlier_leading_channels(isa, offset, dtype):
    """Channels 0..31 of every token far from the rest (ViT features have such massive-activation channels): the
    first values of each output row are then far from the row's mean, where a variance from sums around a shift
    taken from those values would cancel (it was 100x less accurate than F.layer_norm here)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 3200, generator=g)
    x[..., :32] += offset
    x = x.to(dtype)
    w, b = torch.rand(12800, generator=g) + 0.5, torch.randn(12800, generator=g)
    _check_ln(_run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5), x, w, b, 1e-5, "v2")


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_streaming_stores(isa, dtype, monkeypatch):
    """The non-temporal-store path (normally only for outputs larger than the last-level cache), forced on small
    shapes: row counts that leave partial 4-row groups and 32-row chunks, C a multiple of the 64-byte store (it
    streams) and C not one (it must fall back to ordinary stores). Equal to the ordinary-store result bit for bit."""
    shapes = [(3, 36, 32), (5, 64, 64), (1, 4, 96), (2, 16, 48), (3, 16, 40), (1, 36, 17)]
    for shape in shapes:
        x, w, b = _inputs(*shape, dtype)
        for version in ("v1", "v2"):
            monkeypatch.setenv("NVLM_KERNELS_CPU_STREAM", "1")
            shuffled = _run("cpu", pixel_shuffle, x, version=version)
            out = _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)
            monkeypatch.setenv("NVLM_KERNELS_CPU_STREAM", "0")
            assert torch.equal(shuffled, pixel_shuffle_ref(x, version)), shape
            assert torch.equal(out, _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)), shape
            _check_ln(out, x, w, b, 1e-5, version)


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_cpu_bf16_rounding_of_denormals_and_nan(isa):
    """With w = 0 the output is exactly the bias, so its bf16 bits must equal c10's rounding of the fp32 bias:
    denormals kept (AVX512_BF16's instruction would flush them), NaN -> the quiet NaN 0x7FC0 (the instruction would
    keep the payload), round-to-nearest-even ties; one special value per 32-wide step, the rest ordinary."""
    c = 64
    x = torch.randn(2, 16, c).to(torch.bfloat16)
    b = torch.randn(4 * c)
    tiny = torch.finfo(torch.float32).tiny
    b[::32] = torch.tensor([tiny / 3, -tiny / 7, float("nan"), 1e-40, -float("nan"), tiny * 0.75, 5e-39, -1e-45])
    b[5] = 1 + 2**-8  # a tie: rounds to even (1.0)
    b[6] = 1 + 3 * 2**-8  # a tie: rounds to even (1 + 2**-6)
    w = torch.zeros(4 * c)
    for stream in ("0", "1"):
        os.environ["NVLM_KERNELS_CPU_STREAM"] = stream
        try:
            out = _run("cpu", pixel_shuffle_layernorm, x, w, b, 1e-5)
        finally:
            del os.environ["NVLM_KERNELS_CPU_STREAM"]
        bits, want = out.view(torch.int16), b.to(torch.bfloat16).expand_as(out).view(torch.int16)
        nan = b.isnan().expand_as(out)
        assert torch.equal(bits[~nan], want[~nan])
        assert (bits[nan] == 0x7FC0).all()  # c10's NaN (PyTorch's vectorised conversion may give another)


@needs_cpu_kernel
def test_cpu_mixed_parameter_dtypes():
    x, w, b = _inputs(2, 16, 24, torch.bfloat16)
    out = _run("cpu", pixel_shuffle_layernorm, x, w.float(), b.float(), 1e-6, version="v1")
    _check_ln(out, x, w.float(), b.float(), 1e-6, "v1")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 16, 24), (3, 4, 1), (1, 64, 17), (2, 36, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_interpreted(shape, dtype):
    x, w, b = _inputs(*shape, dtype)
    for version in ("v1", "v2"):
        assert torch.equal(_run("triton", pixel_shuffle, x, version=version), pixel_shuffle_ref(x, version))
        out = _run("triton", pixel_shuffle_layernorm, x, w, b, 1e-5, version=version)
        _check_ln(out, x, w, b, 1e-5, version)
    # LayerNorm parameters in fp32 with fp16 activations
    out = _run("triton", pixel_shuffle_layernorm, x, w.float(), b.float(), 1e-5)
    _check_ln(out, x, w.float(), b.float(), 1e-5, "v2")


@needs_interpreter
def test_triton_copy_spans_several_programs():
    # 2C = 1200 > the copy kernel's BLOCK (1024): each span is split over two programs with a masked tail
    x = torch.randn(1, 4, 600)
    assert torch.equal(_run("triton", pixel_shuffle, x), pixel_shuffle_ref(x))


# ----------------------------------------------------------------------------------------------------------------
# Non-contiguous inputs: the public functions make them contiguous; results equal the contiguous ones
# ----------------------------------------------------------------------------------------------------------------
def _backends():
    out = ["ref"]
    if HAS_CPU_KERNEL:
        out.append("cpu")
    if dispatch.triton_available() and dispatch.triton_interpreted():
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_inputs(backend):
    t, n, c = 2, 16, 12
    x = torch.randn(t, c, n).transpose(1, 2)       # [T, N, C] view with strides (C*N, 1, N)
    wb = torch.randn(2, 4 * c * 2)
    w, b = wb[0, ::2], wb[1, 1::2]                  # stride-2 parameter views
    assert not x.is_contiguous() and not w.is_contiguous()
    xc, wc, bc = x.contiguous(), w.contiguous(), b.contiguous()
    for version in ("v1", "v2"):
        assert torch.equal(_run(backend, pixel_shuffle, x, version=version),
                           _run(backend, pixel_shuffle, xc, version=version))
        assert torch.equal(_run(backend, pixel_shuffle_layernorm, x, w, b, version=version),
                           _run(backend, pixel_shuffle_layernorm, xc, wc, bc, version=version))


# ----------------------------------------------------------------------------------------------------------------
# Argument errors: ValueError naming the argument, from the public functions and from the ops themselves
# ----------------------------------------------------------------------------------------------------------------
BAD_X = [
    (torch.randn(2, 16, 8).double(), "'x'"),       # dtype
    (torch.randint(0, 5, (2, 16, 8)), "'x'"),      # integer dtype
    (torch.randn(16, 8), "'x'"),                   # not [T, N, C]
    (torch.randn(2, 8, 8), "N=8"),                 # N not a square
    (torch.randn(2, 9, 8), "N=9"),                 # odd side
    (torch.randn(2, 25, 8), "N=25"),               # odd side
    (torch.randn(2, 0, 8), "N=0"),                 # no tokens
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("x, match", BAD_X, ids=["float64", "int64", "2d", "N8", "N9", "N25", "N0"])
def test_bad_x(backend, x, match):
    w = torch.ones(4 * x.shape[-1])
    with pytest.raises(ValueError, match=match):
        _run(backend, pixel_shuffle, x)
    with pytest.raises(ValueError, match=match):
        _run(backend, pixel_shuffle_layernorm, x, w, w)


@pytest.mark.parametrize("backend", _backends())
def test_bad_layernorm_params_and_version(backend):
    x = torch.randn(2, 16, 8)
    good = torch.ones(32)
    for name, bad in (("weight", torch.ones(31)), ("weight", torch.ones(4, 8)), ("weight", torch.ones(32).long()),
                      ("bias", torch.ones(33)), ("bias", "zeros")):
        args = (bad, good) if name == "weight" else (good, bad)
        with pytest.raises(ValueError, match=f"'{name}'"):
            _run(backend, pixel_shuffle_layernorm, x, *args)
    with pytest.raises(ValueError, match="'version'"):
        _run(backend, pixel_shuffle, x, version="v3")
    with pytest.raises(ValueError, match="'version'"):
        _run(backend, pixel_shuffle_layernorm, x, good, good, version=0)


def _compiled_ops():
    ops = []
    if HAS_CPU_KERNEL:
        ops.append((torch.ops.nvlm_kernels.pixel_shuffle, torch.ops.nvlm_kernels.pixel_shuffle_layernorm))
    if dispatch.triton_available() and dispatch.triton_interpreted():
        ops.append((torch.ops.nvlm_kernels.pixel_shuffle_triton, torch.ops.nvlm_kernels.pixel_shuffle_layernorm_triton))
    return ops


@pytest.mark.parametrize("ops", _compiled_ops(), ids=lambda o: o[0].__name__ if hasattr(o[0], "__name__") else "op")
def test_ops_validate_their_arguments(ops):
    """The ops themselves (callable directly) raise ValueError naming the argument, like the public functions."""
    ps, psln = ops
    x = torch.randn(2, 16, 8)
    w = torch.ones(32)
    with pytest.raises(ValueError, match="'x'"):
        ps(x.transpose(0, 1), 2)                   # non-contiguous (and wrong N): rejected, not misread
    with pytest.raises(ValueError, match="'x'"):
        ps(torch.randn(16, 2, 8).transpose(0, 1), 2)  # right shape, non-contiguous
    with pytest.raises(ValueError, match="'version'"):
        ps(x, 3)
    with pytest.raises(ValueError, match="'weight'"):
        psln(x, torch.ones(31), w, 1e-5, 2)
    with pytest.raises(ValueError, match="'bias'"):
        psln(x, w, torch.ones(32, dtype=torch.int32), 1e-5, 2)
    with pytest.raises(ValueError, match="'x'"):
        psln(torch.randn(2, 12, 8), w, w, 1e-5, 2)


@needs_cpu_kernel
def test_compiled_op_rejects_negative_eps():
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="'eps'"):
        torch.ops.nvlm_kernels.pixel_shuffle_layernorm(x, torch.ones(32), torch.zeros(32), -1.0, 2)


# ----------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, CUDA registration
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ops", _compiled_ops(), ids=lambda o: "op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(ops, dtype):
    ps, psln = ops
    x, w, b = _inputs(2, 16, 12, dtype)
    for version in (1, 2):
        torch.library.opcheck(ps, (x, version))
        torch.library.opcheck(psln, (x, w, b, 1e-5, version))


@needs_cpu_kernel
def test_torch_compile_fullgraph_uses_compiled_cpu_op():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def projector_head(x, w, b):
        return pixel_shuffle_layernorm(x, w, b, 1e-5, version="v2") * 2.0 + pixel_shuffle(x, version="v1")

    x, w, b = _inputs(2, 16, 8, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(projector_head, backend=recording_backend, fullgraph=True)
    out = compiled(x, w, b)
    want = pixel_shuffle_layernorm_ref(x, w, b, 1e-5, "v2") * 2.0 + pixel_shuffle_ref(x, "v1")
    assert (out - want).abs().max().item() <= 1e-5
    targets = {n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in (torch.ops.nvlm_kernels.pixel_shuffle_layernorm, torch.ops.nvlm_kernels.pixel_shuffle):
        assert op in targets or op.default in targets, targets  # dynamo records the packet, AOT the overload
    # and through AOTAutograd (fake tensors via the registered fakes)
    torch._dynamo.reset()
    out2 = torch.compile(projector_head, backend="aot_eager", fullgraph=True)(x, w, b)
    assert torch.equal(out2, out)


@pytest.mark.skipif(not _ext.built_with_cuda(), reason="extension built without CUDA")
def test_cuda_kernels_registered():
    for op in ("pixel_shuffle", "pixel_shuffle_layernorm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nvlm_kernels::{op}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nvlm_kernels::{op}", "CPU")
    assert nvlm_kernels.backends()["compiled_cuda_kernels"]


# ----------------------------------------------------------------------------------------------------------------
# GPU: CUDA C++ and Triton kernels at the real shape (bf16)
# ----------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_shape(backend, dtype):
    if backend == "cuda" and not _ext.has_kernel("pixel_shuffle", "CUDA"):
        pytest.skip("extension built without CUDA kernels")
    x, w, b = _inputs(*REAL, dtype, device="cuda")
    for version in ("v1", "v2"):
        assert torch.equal(_run(backend, pixel_shuffle, x, version=version), pixel_shuffle_ref(x, version))
        _check_ln(_run(backend, pixel_shuffle_layernorm, x, w, b, 1e-5, version=version), x, w, b, 1e-5, version)
        _check_ln(_run(backend, pixel_shuffle_layernorm, x, w.float(), b.float(), 1e-5, version=version),
                  x, w.float(), b.float(), 1e-5, version)


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", ODD + [(1, 16, 9000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_odd_shapes(backend, shape):
    if backend == "cuda" and not _ext.has_kernel("pixel_shuffle", "CUDA"):
        pytest.skip("extension built without CUDA kernels")
    x, w, b = _inputs(*shape, torch.bfloat16, device="cuda")
    assert torch.equal(_run(backend, pixel_shuffle, x), pixel_shuffle_ref(x))
    _check_ln(_run(backend, pixel_shuffle_layernorm, x, w, b), x, w, b, 1e-5, "v2")


# ----------------------------------------------------------------------------------------------------------------
# GPU gate specs (no GPU needed: compiled ahead of time for sm_90a in a subprocess without TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------------------------
_SPEC_SCRIPT = r"""
import inspect, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from nvlm_kernels.pixel_shuffle import gate_specs
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
res = []
for s in gate_specs():
    sig = dict(s["signature"], **{k: "constexpr" for k in s["constexprs"]})
    # torch allocations are 16-byte aligned: the JIT specialises the pointers so; the spec's divisible_by_16 says
    # which parameters (the GPU gate compiles with the same attrs)
    assert sorted(s["divisible_by_16"]) == sorted(p for p, t in s["signature"].items() if t.startswith("*"))
    attrs = {(s["fn"].arg_names.index(p),): [["tt.divisibility", 16]] for p in s["divisible_by_16"]}
    k = triton.compile(triton.compiler.ASTSource(fn=s["fn"], signature=sig, constexprs=s["constexprs"], attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    res.append(dict(name=s["name"], ptxas=out.stderr, v4=("ld.global.v4" in k.asm["ptx"])))
print(json.dumps(res))
"""


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton missing")
def test_gate_specs_describe_the_real_launches():
    specs = gate_specs()
    assert sorted(s["name"] for s in specs) == sorted(["pixel_shuffle_layernorm_bf16", "pixel_shuffle_bf16",
                                                       "pixel_shuffle_layernorm_fp16", "pixel_shuffle_fp16"])
    for s in specs:
        params = s["fn"].arg_names
        assert sorted(list(s["signature"]) + list(s["constexprs"])) == sorted(params), s["name"]
        assert s["constexprs"]["C"] == 3200 and s["constexprs"]["SIDE"] == 32
        assert s["tensor_cores"] is False and isinstance(s["hot_path"], bool)
        assert isinstance(s["num_warps"], int) and isinstance(s["num_stages"], int)
    ln = next(s for s in specs if s["name"] == "pixel_shuffle_layernorm_bf16")
    assert ln["hot_path"] and ln["constexprs"]["BLOCK_C"] >= 3200
    assert ln["signature"]["x_ptr"] == "*bf16" and ln["signature"]["eps"] == "fp32"


@pytest.mark.slow
@pytest.mark.skipif(not dispatch.triton_available(), reason="triton missing")
def test_gate_specs_compile_for_sm90_vectorised_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for s in json.loads(r.stdout.strip().splitlines()[-1]):
        assert "0 bytes spill stores" in s["ptxas"], (s["name"], s["ptxas"])
        assert s["v4"], f"{s['name']}: no 16-byte loads in the PTX"
