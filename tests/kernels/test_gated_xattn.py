"""gated_cross_attention: Triton kernel (interpreter on CPU) vs the fp32 reference, the NVLM-X mask rules, decode
and split-KV, GQA, odd sizes, argument validation, opcheck, torch.compile and the GPU gate specs.

Shapes are tiny on purpose: under TRITON_INTERPRET=1 every program of the grid runs in Python.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import nvlm_kernels
from nvlm_kernels import dispatch
from nvlm_kernels import gated_xattn as gx
from nvlm_kernels.gated_xattn import gated_cross_attention, gated_cross_attention_ref

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = dispatch.triton_available() and (DEV == "cuda" or dispatch.triton_interpreted())
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="triton missing (or no GPU and TRITON_INTERPRET unset)")
BACKENDS = [pytest.param("triton", marks=needs_triton), "ref"]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def _qkv(b, hq, hkv, seq_q, seq_kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, seq_q, d, generator=g)
    k = torch.randn(b, hkv, seq_kv, d, generator=g)
    v = torch.randn(b, hkv, seq_kv, d, generator=g)
    return [t.to(dtype=dtype, device=DEV) for t in (q, k, v)]


def _random_ranges(b, seq_q, seq_kv, seed=0):
    """Random [start, end) per row, about a quarter of them empty (at random positions, not only at 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randint(0, seq_kv + 1, (b, seq_q), generator=g)
    c = torch.randint(0, seq_kv + 1, (b, seq_q), generator=g)
    start, end = torch.minimum(a, c), torch.maximum(a, c)
    empty = torch.rand(b, seq_q, generator=g) < 0.25
    end = torch.where(empty, start, end)
    if seq_kv > 0:
        end[:, -1] = torch.maximum(end[:, -1], start[:, -1] + 1).clamp(max=seq_kv)  # >= 1 non-empty row per batch
        start[:, -1] = torch.minimum(start[:, -1], end[:, -1] - 1)
    return start.int().to(DEV), end.int().to(DEV)


TILE = 4  # image tokens per tile (256 in NVLM)


def _nvlm_x_layout():
    """A two-image NVLM-X prompt as per-token ranges over a memory of image A (2 tiles) then image B (1 tile).

    Returns (kv_start [1, L], kv_end [1, L], M, rows) where rows names the query rows of each kind.
    """
    tokens = (["text"] * 2                      # before any image: empty range, output exactly 0
              + ["tag:0"] * 2 + ["tag:1"]       # <tile_1> (2 tokens), <tile_2> (1 token) of image A
              + ["text_after:A"] * 3            # sees all tiles of image A: [0, 2*TILE)
              + ["tag:2"] * 2                   # <tile_1> of image B = memory tile 2
              + ["text_after:B"] * 2)           # sees images A and B: [0, 3*TILE)
    start, end = [], []
    for t in tokens:
        if t == "text":
            s, e = 0, 0
        elif t.startswith("tag:"):
            k = int(t[4:])
            s, e = k * TILE, (k + 1) * TILE
        else:
            s, e = 0, (2 if t.endswith("A") else 3) * TILE
        start.append(s)
        end.append(e)
    rows = {kind: [i for i, t in enumerate(tokens) if t == kind] for kind in set(tokens)}
    as_t = lambda x: torch.tensor([x], dtype=torch.int32, device=DEV)
    return as_t(start), as_t(end), 3 * TILE, rows


def _gate(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEV)


def _run(backend, *args, **kw):
    with nvlm_kernels.force_backend(backend):
        return gated_cross_attention(*args, **kw)


def _assert_kernel_accuracy(out, q, k, v, gate, start, end, scale=None):
    """Kernel-vs-fp32 error <= 2x the error of the same PyTorch computation in the input precision."""
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    assert torch.isfinite(out).all()
    ref32 = gated_cross_attention_ref(q.float(), k.float(), v.float(), gate.float(), start, end, scale)
    err = (out.float() - ref32).abs().max().item()
    if q.dtype == torch.float32:
        bound = 2e-6 * max(1.0, ref32.abs().max().item())
    else:
        lowp = gated_cross_attention_ref(q, k, v, gate, start, end, scale, upcast=False).float()
        bound = 2 * (lowp - ref32).abs().max().item() + 1e-5
    assert err <= bound, f"max |kernel - fp32 ref| = {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# Kernel vs reference
# ----------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])          # GQA ratios 1, 2, 4
@pytest.mark.parametrize("seq_q,seq_kv", [(1, 17), (5, 5), (17, 1), (5, 17)])
def test_kernel_matches_reference(dtype, hq, hkv, seq_q, seq_kv):
    q, k, v = _qkv(2, hq, hkv, seq_q, seq_kv, 16, dtype, seed=seq_q * 100 + seq_kv)
    start, end = _random_ranges(2, seq_q, seq_kv, seed=seq_q + seq_kv)
    gate = _gate(0.83)
    out = _run("triton", q, k, v, gate, start, end)
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)


@needs_triton
@pytest.mark.parametrize("d", [24, 64])  # 24: padded to BLOCK_D 32 (masked head dim)
def test_kernel_head_dims_and_scale(d):
    q, k, v = _qkv(1, 4, 2, 3, 20, d, torch.float32, seed=d)
    start, end = _random_ranges(1, 3, 20, seed=d)
    gate = _gate(-1.7)
    out = _run("triton", q, k, v, gate, start, end, softmax_scale=0.31)
    _assert_kernel_accuracy(out, q, k, v, gate, start, end, 0.31)


@needs_triton
@pytest.mark.parametrize("alpha", [0.0, 1e-4, -3e-3, 0.124, 0.126, -0.9, 4.0, -20.0])
def test_kernel_tanh_gate(alpha):
    """The in-kernel tanh (series below |x| = 0.125, exp form above) against torch.tanh, tiny to saturated."""
    q, k, v = _qkv(1, 2, 2, 2, 16, 16, torch.float32, seed=3)
    start = torch.zeros(1, 2, dtype=torch.int32, device=DEV)
    end = torch.full((1, 2), 16, dtype=torch.int32, device=DEV)
    out = _run("triton", q, k, v, _gate(alpha), start, end)
    ref = gated_cross_attention_ref(q, k, v, _gate(alpha), start, end)
    assert (out - ref).abs().max().item() <= 1e-6 * max(ref.abs().max().item(), 1e-30) + 1e-12


@needs_triton
@pytest.mark.parametrize("num_splits", [None, 1, 2, 3])
def test_decode_split_kv(num_splits):
    """L = 1 (decode): the KV axis split into partial softmaxes and merged by the combine kernel."""
    q, k, v = _qkv(2, 8, 2, 1, 40, 16, torch.float16, seed=7)
    start = torch.tensor([[3], [0]], dtype=torch.int32, device=DEV)   # a tile-tag-like range and a full one
    end = torch.tensor([[37], [40]], dtype=torch.int32, device=DEV)
    gate = _gate(0.4, torch.float16)
    out = _run("triton", q, k, v, gate, start, end, num_splits=num_splits)
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)


@needs_triton
def test_split_kv_with_empty_and_partial_rows():
    """Splits that hold none of a row's keys, and rows with empty ranges, through the combine kernel."""
    q, k, v = _qkv(1, 2, 1, 6, 48, 16, torch.float32, seed=11)
    start = torch.tensor([[0, 0, 5, 40, 20, 47]], dtype=torch.int32, device=DEV)
    end = torch.tensor([[0, 48, 9, 48, 20, 48]], dtype=torch.int32, device=DEV)
    gate = _gate(2.0)
    out = _run("triton", q, k, v, gate, start, end, num_splits=3)
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)
    assert torch.equal(out[0, [0, 4]], torch.zeros_like(out[0, [0, 4]]))


@needs_triton
def test_gpu_tile_config_under_interpreter():
    """The CUDA prefill/medium tile shapes (not the interpreter's 16 x 16) on a small problem, with padding rows."""
    q, k, v = _qkv(1, 8, 2, 9, 70, 32, torch.float16, seed=5)       # 36 GQA rows per kv head
    start, end = _random_ranges(1, 9, 70, seed=5)
    gate = _gate(0.6, torch.float16)
    for cfg, splits in ((dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32), 1), (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=32), 1),
                        (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=32), 2)):   # the decode tile, split in two
        out = gx._launch(q, k, v, gate, start, end, 32 ** -0.5, splits, config=cfg)
        _assert_kernel_accuracy(out, q, k, v, gate, start, end)


@needs_triton
def test_bf16_under_the_interpreter_or_gpu():
    q, k, v = _qkv(1, 4, 2, 3, 10, 16, torch.bfloat16, seed=2)
    start, end = _random_ranges(1, 3, 10, seed=2)
    gate = _gate(0.5, torch.bfloat16)
    out = _run("triton", q, k, v, gate, start, end)
    assert out.dtype == torch.bfloat16
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,seq_q", [(4, 4, 5), (8, 2, 1), (8, 2, 17)])
def test_ref_backend_matches_reference(dtype, hq, hkv, seq_q):
    """The dispatched no-kernel path (SDPA over GQA-grouped rows) against the explicit fp32 reference."""
    q, k, v = _qkv(2, hq, hkv, seq_q, 19, 32, dtype, seed=hq + seq_q)
    start, end = _random_ranges(2, seq_q, 19, seed=seq_q)
    gate = _gate(-0.6, dtype)
    out = _run("ref", q, k, v, gate, start, end)
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_from_model_layout(backend):
    """q_proj(x).view(B, L, Hq, D).transpose(1, 2) and the same for k/v are taken without a copy."""
    b, seq_q, seq_kv, hq, hkv, d = 1, 5, 12, 4, 2, 16
    q_blhd = torch.randn(b, seq_q, hq, d, device=DEV)
    k_bmhd = torch.randn(b, seq_kv, hkv, d, device=DEV)
    v_bmhd = torch.randn(b, seq_kv, hkv, d, device=DEV)
    start, end = _random_ranges(b, seq_q, seq_kv, seed=9)
    gate = _gate(0.7)
    q, k, v = q_blhd.transpose(1, 2), k_bmhd.transpose(1, 2), v_bmhd.transpose(1, 2)
    assert not q.is_contiguous()
    out = _run(backend, q, k, v, gate, start, end)
    ref = gated_cross_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), gate, start, end)
    assert (out - ref).abs().max().item() <= 2e-6


# ----------------------------------------------------------------------------------------------------------------
# Mask rules (NVLM-X): tag k sees only tile k; text sees the images before it; text before any image is exactly 0
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_rules_nvlm_x_layout(backend):
    start, end, seq_kv, rows = _nvlm_x_layout()
    seq_q = start.shape[1]
    q, k, v = _qkv(1, 4, 2, seq_q, seq_kv, 16, torch.float32, seed=21)
    gate = _gate(1.3)
    out = _run(backend, q, k, v, gate, start, end)
    assert torch.isfinite(out).all()
    # Text before any image: exactly zero (no NaN from an empty softmax).
    assert torch.equal(out[0, rows["text"]], torch.zeros_like(out[0, rows["text"]]))
    # Every row against the dense-mask reference.
    _assert_kernel_accuracy(out, q, k, v, gate, start, end)

    # A <tile_k> row sees only tile k: any change to the other tiles' K/V leaves it bit-identical.
    for tile in range(3):
        tag_rows = rows[f"tag:{tile}"]
        k2, v2 = k.clone(), v.clone()
        other = [m for m in range(seq_kv) if not tile * TILE <= m < (tile + 1) * TILE]
        k2[:, :, other] = torch.randn_like(k2[:, :, other]) * 30
        v2[:, :, other] = torch.randn_like(v2[:, :, other]) * 30
        out2 = _run(backend, q, k2, v2, gate, start, end)
        assert torch.equal(out2[0, tag_rows], out[0, tag_rows]), f"tile {tile} tag rows changed"
        # ... and changing its own tile does change it (the check above is not vacuous).
        k3 = k.clone()
        k3[:, :, tile * TILE] += 5
        assert not torch.equal(_run(backend, q, k3, v, gate, start, end)[0, tag_rows], out[0, tag_rows])

    # Text after image A does not see image B.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2 * TILE:] = 100.0
    v2[:, :, 2 * TILE:] = -100.0
    out2 = _run(backend, q, k2, v2, gate, start, end)
    assert torch.equal(out2[0, rows["text_after:A"]], out[0, rows["text_after:A"]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_zero_gives_exact_zero(backend):
    q, k, v = _qkv(2, 4, 2, 5, 17, 16, torch.float16, seed=4)
    start, end = _random_ranges(2, 5, 17, seed=4)
    out = _run(backend, q, k, v, _gate(0.0, torch.float16), start, end)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_kv", [5, 0])  # 0: no image memory at all
def test_all_rows_empty(backend, seq_kv):
    q, k, v = _qkv(1, 2, 2, 3, seq_kv, 16, torch.float32, seed=6)
    z = torch.full((1, 3), min(2, seq_kv), dtype=torch.int32, device=DEV)
    out = _run(backend, q, k, v, _gate(0.9), z, z)
    assert torch.equal(out, torch.zeros_like(out))


def test_reference_matches_independent_sdpa():
    """The reference against torch SDPA (boolean mask, expanded K/V) on rows with non-empty ranges."""
    q, k, v = _qkv(2, 4, 2, 6, 9, 16, torch.float32, seed=8)
    start, end = _random_ranges(2, 6, 9, seed=8)
    gate = _gate(-0.45)
    ref = gated_cross_attention_ref(q, k, v, gate, start, end)        # [B, L, Hq, D]
    mask = gx.ranges_to_mask(start, end, 9)[:, None]                    # [B, 1, L, M]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask | ~mask.any(-1, keepdim=True))
    sdpa = (torch.tanh(gate) * sdpa * mask.any(-1, keepdim=True)).transpose(1, 2)
    assert (ref - sdpa).abs().max().item() <= 2e-6


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _good():
    q, k, v = _qkv(1, 4, 2, 3, 8, 16, torch.float32)
    start, end = _random_ranges(1, 3, 8)
    return dict(q=q, k=k, v=v, gate=_gate(0.5), kv_start=start, kv_end=end)


def _bad_cases():
    i32 = dict(dtype=torch.int32, device=DEV)
    return [
        ("q", dict(q=torch.randn(4, 3, 16, device=DEV))),
        ("q", dict(q=torch.randint(0, 3, (1, 4, 3, 16), device=DEV))),
        ("k", dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float16, device=DEV))),
        ("'k' and 'v'", dict(v=torch.randn(1, 2, 7, 16, device=DEV))),
        ("'k'", dict(k=torch.randn(1, 2, 8, 8, device=DEV), v=torch.randn(1, 2, 8, 8, device=DEV))),
        ("Hkv=3", dict(k=torch.randn(1, 3, 8, 16, device=DEV), v=torch.randn(1, 3, 8, 16, device=DEV))),
        ("stride 1", dict(q=torch.randn(1, 4, 3, 32, device=DEV)[..., ::2])),
        ("gate", dict(gate=torch.ones(2, device=DEV))),
        ("gate", dict(gate=0.5)),
        ("kv_start", dict(kv_start=torch.zeros(1, 4, **i32))),
        ("kv_end", dict(kv_end=torch.zeros(1, 3, dtype=torch.int64, device=DEV))),
        ("0 <= start", dict(kv_start=torch.tensor([[-1, 0, 0]], **i32))),
        ("end <= M=8", dict(kv_start=torch.zeros(1, 3, **i32), kv_end=torch.tensor([[8, 9, 1]], **i32))),
        ("start <= end", dict(kv_start=torch.tensor([[0, 5, 0]], **i32), kv_end=torch.tensor([[1, 4, 1]], **i32))),
        ("softmax_scale", dict(softmax_scale=-1.0)),
        ("num_splits", dict(num_splits=0)),
    ]


@pytest.mark.parametrize("needle,change", _bad_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments_raise(needle, change):
    args = _good()
    kw = {name: change.pop(name) for name in ("softmax_scale", "num_splits") if name in change}
    args.update(change)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        gated_cross_attention(**args, **kw)


def test_out_of_range_check_can_be_skipped_and_kernel_stays_in_bounds():
    """check_ranges=False trusts the caller; the reference still runs (the kernel never reads outside k/v)."""
    args = _good()
    args["kv_end"] = torch.tensor([[8, 8, 8]], dtype=torch.int32, device=DEV)
    out = gated_cross_attention(**args, check_ranges=False)
    assert torch.isfinite(out).all()


@needs_triton
def test_triton_rejects_head_dim_over_128_when_forced():
    q, k, v = _qkv(1, 2, 2, 2, 4, 160, torch.float32)
    start, end = _random_ranges(1, 2, 4)
    with pytest.raises(RuntimeError, match="forced"):
        _run("triton", q, k, v, _gate(0.5), start, end)
    out = _run(None, q, k, v, _gate(0.5), start, end)  # automatic choice falls back to the reference
    assert out.shape == (1, 2, 2, 160)


def test_training_uses_the_differentiable_path():
    """With gradients needed (training the x-attn layers) the dispatcher picks the SDPA path, which backprops."""
    q, k, v = _qkv(1, 4, 2, 3, 8, 16, torch.float32, seed=14)
    start, end = _random_ranges(1, 3, 8, seed=14)
    gate = torch.nn.Parameter(_gate(0.2))
    before = dispatch.usage[("gated_cross_attention", "ref")]
    out = gated_cross_attention(q, k, v, gate, start, end)
    assert dispatch.usage[("gated_cross_attention", "ref")] == before + 1
    out.sum().backward()
    assert gate.grad is not None and torch.isfinite(gate.grad).all() and gate.grad.abs().item() > 0


# ----------------------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ----------------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("num_splits", [0, 2])
def test_opcheck(num_splits):
    q, k, v = _qkv(1, 4, 2, 3, 20, 16, torch.float32, seed=12)
    start, end = _random_ranges(1, 3, 20, seed=12)
    torch.library.opcheck(torch.ops.nvlm_kernels.gated_cross_attention_triton,
                          (q, k, v, _gate(0.3), start, end, 0.25, num_splits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The public function traces into one graph (check_ranges=False: the check's host sync would break it)."""
    q, k, v = _qkv(1, 4, 2, 3, 20, 16, torch.float32, seed=13)
    start, end = _random_ranges(1, 3, 20, seed=13)
    gate = _gate(0.3)

    def block(q, k, v, gate, start, end):
        o = gated_cross_attention(q, k, v, gate, start, end, softmax_scale=0.25, check_ranges=False)
        return o.view(o.shape[0], o.shape[1], -1) * 2.0        # the o_proj input view needs a contiguous output

    with nvlm_kernels.force_backend(backend):
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        out = compiled(q, k, v, gate, start, end)
    ref = gated_cross_attention_ref(q, k, v, gate, start, end, 0.25).flatten(2) * 2.0
    assert (out - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# GPU gate specs (need no GPU: the kernels are compiled ahead of time for sm_90a in a subprocess)
# ----------------------------------------------------------------------------------------------------------------
_SPEC_SCRIPT = r"""
import inspect, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from nvlm_kernels.gated_xattn import gate_specs
compile_ = sys.argv[1] == "1"
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
res = []
for s in gate_specs():
    params = list(inspect.signature(s["fn"].fn).parameters)
    row = dict(name=s["name"], params=params, sig=list(s["signature"]), cex=list(s["constexprs"]),
               keys=sorted(s), types=sorted(set(s["signature"].values())))
    if compile_:
        sig = dict(s["signature"], **{k: "constexpr" for k in s["constexprs"]})
        # the JIT's 16-divisibility specialisation at the real launch (see nvlm_kernels.gpu_gate)
        attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in s.get("divisible_by_16", [])}
        k = triton.compile(triton.compiler.ASTSource(fn=s["fn"], signature=sig, constexprs=s["constexprs"],
                                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        row.update(ptxas=out, tc=("wgmma" in k.asm["ptx"]) or ("mma.sync" in k.asm["ptx"]),
                   tensor_cores=s["tensor_cores"])
    res.append(row)
print(json.dumps(res))
"""


def _specs(compile_: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SPEC_SCRIPT, "1" if compile_ else "0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton missing")
def test_gate_specs_describe_every_parameter():
    specs = _specs(compile_=False)
    assert [s["name"] for s in specs] == ["gxattn_fwd_prefill_L1024", "gxattn_fwd_decode_split",
                                          "gxattn_combine_decode"]
    for s in specs:
        assert sorted(s["sig"] + s["cex"]) == sorted(s["params"]), s["name"]
        assert set(s["types"]) <= {"*bf16", "*fp32", "*i32", "i32", "fp32"}
        for key in ("name", "fn", "signature", "constexprs", "num_warps", "num_stages", "hot_path", "tensor_cores"):
            assert key in s["keys"]


@pytest.mark.slow
@pytest.mark.skipif(not dispatch.triton_available(), reason="triton missing")
def test_gate_specs_compile_for_sm90_without_spills():
    for s in _specs(compile_=True):
        assert "0 bytes spill stores" in s["ptxas"], (s["name"], s["ptxas"])
        if s["tensor_cores"]:
            assert s["tc"], f"{s['name']}: no wgmma/mma in the PTX"
