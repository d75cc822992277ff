"""Resources: running out of GPU memory while loading gives the planner's advice (GPUs needed, which quantisation)
instead of a bare CUDA OOM; a device that is not present fails before any file is opened."""

import builtins
import io
import os
import re
from pathlib import Path

import pytest
import torch

import nvlm.plan
from nvlm import cli, loading
from nvlm.config import NVLMConfig
from nvlm.model import NVLM
from nvlm.plan import plan

CUDA_OOM = "CUDA out of memory. Tried to allocate 1.16 GiB. GPU 0 has a total capacity of 79.11 GiB"


def oom_after(n):
    """An ``_assign_tensor`` that fails like ``tensor.to('cuda')`` on a full GPU at its n-th call."""
    real = loading._assign_tensor
    calls = []

    def assign(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == n:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)

    return assign


def test_oom_while_loading_gives_the_planners_advice(checkpoint, monkeypatch):
    config = NVLMConfig.from_json(checkpoint)
    ctx = config.llm.max_position_embeddings
    # A GPU just too small for tiny-d in bf16 on its own, big enough for int8: the advice must say so.
    totals = {q: plan(config, quant=q, context=ctx).total_bytes for q in ("bf16", "int8", "int4")}
    assert totals["int4"] < totals["int8"] < totals["bf16"]
    monkeypatch.setitem(nvlm.plan.GPUS, "h100-80gb", (totals["int8"] + totals["bf16"]) // 2)
    monkeypatch.setattr(loading, "_assign_tensor", oom_after(5))
    with pytest.raises(torch.OutOfMemoryError) as info:
        NVLM.from_pretrained(checkpoint, progress=False)
    msg = str(info.value)
    assert msg.startswith(f"out of GPU memory while loading {str(checkpoint)!r} onto cpu as bf16 ({CUDA_OOM})")
    assert re.search(r"bf16 [\d.]+ GB weights -> 2 GPUs, int8 [\d.]+ GB weights -> 1 GPU, int4 [\d.]+ GB weights "
                     r"-> 1 GPU", msg), msg
    assert "Advice: load with quantization='int8' (CLI: --quant int8) to fit one h100-80gb" in msg
    assert f"`nvlm plan --model {checkpoint} --quant int8 --gpu h100-80gb`" in msg
    assert "\n" not in msg
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)    # the original, for --debug


def test_oom_advice_for_the_72b_model():
    """The real case: NVLM-D-72B in bf16 on one H100 -> 4 GPUs, or int4 on one."""
    err = torch.cuda.OutOfMemoryError(CUDA_OOM)
    config = NVLMConfig.preset("nvlm-d-72b")
    msg = loading._oom_advice(Path("/data/NVLM-D-72B"), config, None, torch.device("cuda:0"), err)
    assert "bf16 158.8 GB weights -> 4 GPUs, int8 81.9 GB weights -> 2 GPUs, int4 45.2 GB weights -> 1 GPU" in msg
    assert "Advice: load with quantization='int4'" in msg
    # Already int4 and still out of memory: the planner says it should fit, so something else holds memory.
    from nvlm.quant import Int4WeightOnly

    msg = loading._oom_advice(Path("/data/NVLM-D-72B"), config, Int4WeightOnly(), torch.device("cuda:0"), err)
    assert "as int4" in msg and "int4 fits one h100-80gb: free GPU memory used by other processes" in msg


def test_oom_advice_never_hides_the_error(monkeypatch):
    """If the planner itself fails, the message still carries the original error."""
    monkeypatch.setattr(nvlm.plan, "plan", lambda *a, **k: 1 / 0)
    msg = loading._oom_advice(Path("/x"), NVLMConfig.preset("tiny-d"), "int8", torch.device("cuda"),
                              torch.cuda.OutOfMemoryError(CUDA_OOM))
    assert CUDA_OOM in msg and "planner failed: division by zero" in msg and "(int8)" in msg


def test_oom_in_the_cli_is_one_line(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(loading, "_assign_tensor", oom_after(3))
    assert cli.main(["chat", "hi", "--model", str(checkpoint), "--quant", "int4"]) == 2
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last.startswith("nvlm: error: out of GPU memory while loading") and "as int4" in last
    assert "Planner for h100-80gb" in last and "Advice:" in last


# ----------------------------------------------------------------------------------------------------------------
# A device that is not there
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def file_opens(monkeypatch):
    """Every attempt to open a file (Python or safetensors) from now on, recorded."""
    opened = []

    def spy(real):
        def wrapper(*args, **kwargs):
            opened.append(args[0] if args else kwargs)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    monkeypatch.setattr(loading, "safe_open", spy(loading.safe_open))
    monkeypatch.setattr(loading, "_read_tensors", spy(loading._read_tensors))
    return opened


ABSENT_CUDA = f"cuda:{torch.cuda.device_count()}"    # "cuda:0" here (no GPU); one past the last GPU elsewhere


@pytest.mark.parametrize("device, match", [
    (ABSENT_CUDA, rf"argument 'device' is '{ABSENT_CUDA}' but this machine has {torch.cuda.device_count()} usable "
                  r"CUDA device\(s\); nothing was loaded"),
    (torch.device(ABSENT_CUDA), "nothing was loaded"),
    ("mps", r"argument 'device' 'mps' is not available here"),
    ("gpu", r"argument 'device' 'gpu' is not a device"),
])
def test_absent_device_fails_before_any_file_is_opened(checkpoint, file_opens, device, match):
    with pytest.raises(ValueError, match=match):
        NVLM.from_pretrained(checkpoint, device=device, progress=False)
    assert file_opens == []


def test_the_spy_sees_a_normal_load(checkpoint, file_opens):
    """The fixture above really records opens: a successful load goes through it."""
    NVLM.from_pretrained(checkpoint, progress=False)
    assert any(str(p).endswith(".safetensors") for p in file_opens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the default 'cuda' on a machine without a GPU")
def test_cli_device_cuda_without_gpu(checkpoint, capsys):
    assert cli.main(["chat", "hi", "--model", str(checkpoint), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("nvlm: error: from_pretrained: argument 'device' is 'cuda' but this machine "
                                       "has 0 usable CUDA device(s); nothing was loaded\n")
