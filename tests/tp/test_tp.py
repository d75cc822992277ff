"""Tensor parallelism (nvlm.tp) on CPU with gloo: 2 processes spawned here must give the single-process model's
logits and greedy tokens on tiny-d, tiny-x, tiny-h, in bf16, fp32 and int4 (g32), plus on tiny-d int8, int4 g128
(zero-padded MLPs) and a checkpoint saved int4, and hold exactly their slices of the single-process weights; plus
the README's ``torchrun ... nvlm chat --tp 2`` command and in-process checks (int4 straddle error, planner).

Tolerances. Gloo's all-gather (logits) and the embedding all-reduce (one non-zero contribution per id) are exact;
the only numerical difference is the row-parallel all-reduce: o_proj / down_proj (and the cross-attention
blocks') products are summed as 2 partial sums, each rounded to the activation dtype, instead of one sum.
* fp32: a different summation order changes each row-parallel output by a few float32 units (2^-24 relative);
  through the tiny models' layers the logits (|logit| <= ~4.5, one float32 unit = 4.8e-7) moved by <= 2.4e-6
  when measured: atol 2e-5 (~40 units) is tight, and a real bug (a wrong slice, a missing or doubled all-reduce)
  gives O(1) errors.
* bf16 (and int4/int8 with bf16 activations): one extra bf16 rounding (2^-9 relative) per row-parallel layer, i.e.
  the same kind of error bf16 makes everywhere else. We bound the tensor-parallel logits' error against the fp32
  run of the same checkpoint (same quantisation config) by 2x the error of the single-process bf16 model itself
  (the team's low-precision rule; measured: TP and single-process errors within 10% of each other), plus allclose
  to the single-process bf16 logits at atol = 4 * 2^-8 * max|logit| (2-4 bf16 units at the largest logits;
  measured <= 3.5 units).
Greedy tokens must be identical in every case.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import tp_worker  # noqa: E402

from nvlm.testing import make_checkpoint  # noqa: E402
from nvlm.tp import shard_dim  # noqa: E402

WORLD = 2
TIMEOUT_S = 150
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    for preset in ("tiny-d", "tiny-x", "tiny-h"):
        make_checkpoint(root / preset, preset, seed=1, dtype=torch.float32)
    from nvlm.model import NVLM
    from nvlm.quant import Int4WeightOnly

    quantized = NVLM.from_pretrained(root / "tiny-d", quantization=Int4WeightOnly(group_size=32), progress=False)
    quantized.save_pretrained(root / "tiny-d-int4saved", num_shards=3)
    return root


def _references(root: Path) -> dict:
    """Single-process results of every case, plus the fp32-activation run of the same weights for the bf16 ones."""
    refs = {}
    for preset, dtype, quant in tp_worker.CASES:
        logits, seq, model = tp_worker.run_case(root / preset, dtype, quant)
        refs[(preset, dtype, quant)] = (logits, seq, model.state_dict())
    for preset, dtype, quant in tp_worker.CASES:
        if dtype != "float32" and (preset, "float32", quant) not in refs:
            logits, seq, model = tp_worker.run_case(root / preset, "float32", quant)
            refs[(preset, "float32", quant)] = (logits, seq, model.state_dict())
    return refs


@pytest.fixture(scope="module")
def results(checkpoints, tmp_path_factory):
    """Spawn 2 gloo ranks running every case (terminated if they hang) and, meanwhile, the single-process runs."""
    out = tmp_path_factory.mktemp("tp_out")
    ctx = mp.start_processes(tp_worker.worker, args=(WORLD, _free_port(), str(checkpoints), str(out)),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        refs = _references(checkpoints)
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"tensor-parallel workers did not finish in {TIMEOUT_S} s (hang?)")
    except mp.ProcessRaisedException as e:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error.rank*.txt")))
        pytest.fail(f"a tensor-parallel worker failed:\n{errors or e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return out, refs


@pytest.mark.parametrize("preset,dtype,quant", tp_worker.CASES,
                         ids=[tp_worker.case_name(*c) for c in tp_worker.CASES])
def test_tp_matches_single_process(results, preset, dtype, quant):
    out, refs = results
    name = tp_worker.case_name(preset, dtype, quant)
    got = load_file(str(out / f"{name}.out.safetensors"))
    logits, seq, full = refs[(preset, dtype, quant)]

    # Each rank holds exactly its slice of the single-process weights (bit-for-bit, quantised ones included).
    padded = 0
    for rank in range(WORLD):
        state = load_file(str(out / f"{name}.rank{rank}.state.safetensors"))
        assert set(state) == set(full)
        for key, value in state.items():
            dim = shard_dim(key)
            if dim is None:
                assert torch.equal(value, full[key]), f"{name}: rank {rank} {key} differs from the single process"
                continue
            # rank r holds entries [r*w, (r+1)*w) of dim (w = its width); beyond the stored size: zero padding
            w = value.shape[dim]
            n = max(0, min(w, full[key].shape[dim] - rank * w))
            want = full[key].narrow(dim, rank * w, n)
            assert torch.equal(value.narrow(dim, 0, n), want), f"{name}: rank {rank} {key} is not its slice"
            if n < w:                                                  # padding (int4g128 MLPs only)
                assert quant == "int4g128" and ".mlp." in key, f"{name}: unexpected padding of {key}"
                padded += 1
                if key.endswith(".weight"):
                    assert not value.narrow(dim, n, w - n).any(), f"{name}: padding of {key} is not zero"

    assert (padded > 0) == (quant == "int4g128"), f"{name}: {padded} padded tensors"
    assert torch.equal(got["seq"], seq), f"{name}: greedy tokens differ: {got['seq'].tolist()} vs {seq.tolist()}"
    diff = (got["logits"] - logits).abs().max().item()
    if dtype == "float32":
        print(f"\n{name}: max |tp - single| = {diff:.3g} (max |logit| {logits.abs().max().item():.3g})")
        torch.testing.assert_close(got["logits"], logits, rtol=0, atol=2e-5)
        return
    ref = refs[(preset, "float32", quant)][0]                 # same weights, fp32 activations
    own_err = (logits - ref).abs().max().item()
    tp_err = (got["logits"] - ref).abs().max().item()
    print(f"\n{name}: max |tp - single| = {diff:.3g}; vs fp32: tp {tp_err:.3g}, single {own_err:.3g} "
          f"(max |logit| {logits.abs().max().item():.3g})")
    assert tp_err <= 2 * own_err + 1e-6, f"{name}: TP error {tp_err} vs single-process bf16 error {own_err}"
    atol = 4 * 2**-8 * logits.abs().max().item()
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=atol)


def test_torchrun_chat_matches_single_process(checkpoints):
    """The README command: `torchrun --nproc-per-node 2 -m nvlm chat --tp 2` prints what `nvlm chat` prints."""
    args = ["chat", "What shape is on the left?", "--model", str(checkpoints / "tiny-d"), "--image",
            str(tp_worker.IMAGE), "--max-new-tokens", "6", "--dtype", "float32"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "nvlm", *args], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=env)
    assert single.returncode == 0, single.stderr
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port()), "-m", "nvlm", *args, "--tp", "2"]
    tp = subprocess.run(torchrun, capture_output=True, text=True, timeout=150, cwd=REPO, env=env)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert single.stdout.strip(), "single-process chat printed nothing"
    assert tp.stdout == single.stdout           # rank 0 prints the reply once; other ranks print nothing


# ----------------------------------------------------------------------------------------------------------------
# In-process checks (no process group needed)
# ----------------------------------------------------------------------------------------------------------------
def test_int4_group_straddling_a_rank_boundary_raises():
    """tiny-d's down_proj has K = 128: split 2 ways each rank has 64 columns, so g128 groups would straddle."""
    from nvlm.config import NVLMConfig
    from nvlm.model import NVLM
    from nvlm.tp import check_int4_groups

    with torch.device("meta"):
        model = NVLM(NVLMConfig.preset("tiny-d"))
    name = "language_model.model.layers.0.mlp.down_proj"
    with pytest.raises(ValueError, match=r"down_proj' has K = 128; split 2 ways each rank gets K = 64, not a "
                                         r"multiple of group_size = 128"):
        check_int4_groups(model, 2, 128, {name})
    check_int4_groups(model, 2, 32, {name})                       # 64 = 2 groups of 32 per rank: fine


def test_shard_dim_rules():
    assert shard_dim("language_model.model.layers.3.self_attn.q_proj.bias") == 0
    assert shard_dim("language_model.model.layers.3.self_attn.o_proj.weight") == 1
    assert shard_dim("language_model.model.xattn_layers.0.mlp.down_proj.qweight") == 1
    assert shard_dim("language_model.model.layers.0.mlp.down_proj.scale") is None     # int8 per-row scale
    assert shard_dim("language_model.model.embed_tokens.weight") == 0
    assert shard_dim("language_model.lm_head.weight") == 0
    assert shard_dim("vision_model.encoder.layers.0.attn.qkv.weight") is None           # vision replicated
    assert shard_dim("language_model.model.norm.weight") is None
    with pytest.raises(ValueError, match="row-parallel layer .* has a 'bias'"):
        shard_dim("language_model.model.layers.0.self_attn.o_proj.bias")


def test_from_pretrained_tp_needs_a_process_group(checkpoints):
    from nvlm.model import NVLM

    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        NVLM.from_pretrained(checkpoints / "tiny-d", tp_size=2)


def test_plan_tp_per_gpu_bytes():
    from nvlm.plan import plan

    one = plan("tiny-d", quant="bf16", context=64)
    two = plan("tiny-d", quant="bf16", context=64, tp=2)
    assert one.tp_size is None and two.tp_size == 2
    split = two.weight_bytes["decoder"] + two.weight_bytes["embeddings"] + two.weight_bytes["lm_head"]
    # split parts halve, except the decoder's norms (640 bytes in tiny-d); vision tower and projector stay whole
    assert two.tp_weights_bytes_per_gpu == one.weights_bytes - (split - 640) // 2
    assert two.tp_kv_cache_bytes_per_gpu * 2 == one.kv_cache_bytes
    # int4 g128: down_proj (K = 128) is zero-padded to 256 for 2 ranks: each holds 128 of its columns
    padded = plan("tiny-d", quant="int4", group_size=128, context=64, tp=2)
    assert padded.tp_fits and any("zero-padded" in n for n in padded.notes)
