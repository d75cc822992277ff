"""What each of the 2 gloo processes of ``test_tp.py`` runs (a module of its own so ``torch.multiprocessing``'s
spawn can import it), and what the single-process reference runs: the same function on the same inputs."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch

#: (preset, activation dtype, quantisation) cases; int4 uses groups of 32 so the row-parallel K = 64 / 2 = 32 of
#: the tiny presets' o_proj and down_proj holds whole groups (group 128 would not quantise them at all).
#: int8 (exact thanks to the all-reduced row absmax) is checked on tiny-d only, to keep the folder under 3 minutes.
#: "int4g128": tiny-d's down_proj (K = 128, quantised in one process) would give each rank 64 columns, half a
#: group: the MLP intermediate size is zero-padded to 256 (rank 1 holds only padding) and results must not change.
#: "tiny-d-int4saved": a checkpoint saved after int4 (g32) quantisation; the ranks slice its packed tensors.
CASES = [(p, d, q) for p in ("tiny-d", "tiny-x", "tiny-h") for d, q in
         (("bfloat16", None), ("float32", None), ("bfloat16", "int4"))] + [("tiny-d", "bfloat16", "int8"),
                                                                           ("tiny-d", "bfloat16", "int4g128"),
                                                                           ("tiny-d-int4saved", "bfloat16", None)]
NEW_TOKENS = 6
IMAGE = Path(__file__).resolve().parents[2] / "nvlm" / "assets" / "example.png"


def case_name(preset: str, dtype: str, quant: str | None) -> str:
    return f"{preset}-{dtype}-{quant or 'float'}"


def quant_config(quant: str | None):
    from nvlm.quant import Int4WeightOnly, Int8WeightOnly

    return {None: None, "int4": Int4WeightOnly(group_size=32), "int8": Int8WeightOnly(),
            "int4g128": Int4WeightOnly(group_size=128)}[quant]


@torch.no_grad()
def run_case(folder: Path, dtype: str, quant: str | None, tp_size: int = 1):
    """Load ``folder`` (tensor parallel when ``tp_size > 1``); return (full-prompt logits [1, L, V] fp32, greedy
    sequence [1, L + NEW_TOKENS], the model)."""
    from nvlm.model import NVLM

    model = NVLM.from_pretrained(folder, dtype=getattr(torch, dtype), quantization=quant_config(quant),
                                 progress=False, tp_size=tp_size)
    inputs = model.processor(images=[str(IMAGE)], text="What shape is on the left?", max_num=2)
    ids, pixels = inputs["input_ids"], inputs["pixel_values"].to(getattr(torch, dtype))
    layout = inputs.get("xattn_layout")
    logits = model(ids, pixels, xattn_layout=layout).logits.float()
    seq = model.generate(ids, pixels, xattn_layout=layout, max_new_tokens=NEW_TOKENS, eos_token_id=None)
    return logits, seq, model


def worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One tensor-parallel rank: every case, logits + greedy tokens + this rank's state dict -> safetensors."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"          # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        for preset, dtype, quant in CASES:
            name = case_name(preset, dtype, quant)
            logits, seq, model = run_case(Path(root) / preset, dtype, quant, tp_size=world)
            try:                                      # a rank's slices must never be saved as a checkpoint
                model.save_pretrained(f"{out}/{name}.rank{rank}.ckpt")
            except ValueError as e:
                assert "tensor-parallel rank" in str(e), e
            else:
                raise AssertionError("save_pretrained of a tensor-parallel rank did not raise")
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, f"{out}/{name}.rank{rank}.state.safetensors")
            if rank == 0:
                save_file({"logits": logits, "seq": seq}, f"{out}/{name}.out.safetensors")
            del model
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        Path(f"{out}/error.rank{rank}.txt").write_text(traceback.format_exc())
        raise
