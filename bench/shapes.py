"""Benchmark shapes: the real NVLM-D-72B shapes (shared/docs/nvlm_spec.md) and tiny ones for quick runs.

Linear shapes are ``(K, N)``: input features -> output features (weight ``[N, K]``). Activations are ``M`` rows.
"""

# ---- NVLM-D-72B: Qwen2-72B decoder -------------------------------------------------------------------------------
HIDDEN = 8192                 # decoder hidden size
INTERMEDIATE = 29568          # decoder MLP width
NUM_HEADS = 64
NUM_KV_HEADS = 8
HEAD_DIM = 128
Q_OUT = NUM_HEADS * HEAD_DIM  # 8192
KV_OUT = NUM_KV_HEADS * HEAD_DIM  # 1024
VOCAB = 152064

DECODER_LINEARS = {           # name -> (K, N)
    "q_proj": (HIDDEN, Q_OUT),
    "k_proj": (HIDDEN, KV_OUT),
    "v_proj": (HIDDEN, KV_OUT),
    "o_proj": (Q_OUT, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}

# ---- InternViT-6B (as stored: 32 heads, 25 real + 7 dummy) -----------------------------------------------------
VIT_HIDDEN = 3200
VIT_INTERMEDIATE = 12800
VIT_HEADS = 25                # real heads; the checkpoint pads to 32
VIT_HEADS_PADDED = 32
VIT_HEAD_DIM = 128
VIT_QKV_OUT = 3 * VIT_HEADS_PADDED * VIT_HEAD_DIM  # 12288
VIT_TOKENS = 1025             # 1 CLS + 32x32 patches per 448 px tile
VIT_LINEARS = {
    "qkv": (VIT_HIDDEN, VIT_QKV_OUT),
    "proj": (VIT_HEADS_PADDED * VIT_HEAD_DIM, VIT_HIDDEN),  # (4096, 3200)
    "fc1": (VIT_HIDDEN, VIT_INTERMEDIATE),
    "fc2": (VIT_INTERMEDIATE, VIT_HIDDEN),
}

# ---- Tiles, pixel shuffle, projector ---------------------------------------------------------------------------
MAX_TILES = 7                 # 6 tiles + thumbnail
TILES = (MAX_TILES, VIT_TOKENS, VIT_HIDDEN)        # [7, 1025, 3200] ViT activations
SHUFFLE_IN = (MAX_TILES, 1024, VIT_HIDDEN)         # [7, 1024, 3200] after dropping CLS
SHUFFLE_OUT = (MAX_TILES, 256, 4 * VIT_HIDDEN)     # [7, 256, 12800]
PROJECTOR_LINEARS = {
    "mlp1.1": (4 * VIT_HIDDEN, INTERMEDIATE),      # 12800 -> 29568
    "mlp1.3": (INTERMEDIATE, HIDDEN),              # 29568 -> 8192
}
IMAGE_TOKENS = MAX_TILES * 256                     # 1792 image tokens in the decoder sequence

# ---- Typical M for the quantised linears -------------------------------------------------------------------------
DECODE_M = (1, 16)            # batch-1 decode, small-batch decode
PREFILL_M = (256, 2048)

# ---- Tiny shapes: the ``tiny-d`` preset of nvlm/config.py (tests / --quick) ------------------------------------
TINY = {
    "hidden": 64,
    "intermediate": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "vit_hidden": 128,
    "vit_intermediate": 256,
    "vit_heads": 2,
    "vit_head_dim": 64,
    "vit_tokens": 257,         # 1 CLS + 16x16 patches of a 224 px tile
    "tiles": 2,
}
TINY_TILES = (TINY["tiles"], TINY["vit_tokens"], TINY["vit_hidden"])            # [2, 257, 128]
TINY_SHUFFLE_IN = (TINY["tiles"], TINY["vit_tokens"] - 1, TINY["vit_hidden"])   # [2, 256, 128]
TINY_LINEARS = {
    "q_proj": (TINY["hidden"], TINY["num_heads"] * TINY["head_dim"]),
    "gate_proj": (TINY["hidden"], TINY["intermediate"]),
    "down_proj": (TINY["intermediate"], TINY["hidden"]),
}


def linear_bytes(k: int, n: int, bits: int, group: int | None = 128, m: int = 1, act_bytes: int = 2) -> int:
    """Bytes a weight-only linear reads/writes once: packed weight, scales (+ zeros for int4 groups; 2-byte scales,
    1-byte zeros), activations in and out. ``bits`` = 16 for a bf16 weight."""
    weight = k * n * bits // 8
    if bits == 16:
        meta = 0
    elif group is None:                     # per-channel (int8): one scale per output channel
        meta = 2 * n
    else:                                   # group-wise (int4): scale + zero per group
        meta = (k // group) * n * (2 + 1)
    return weight + meta + act_bytes * m * (k + n)
