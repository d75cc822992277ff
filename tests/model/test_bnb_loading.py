"""bitsandbytes as an alternative backend at load time: ``from_pretrained(quantization="bnb-nf4" | "bnb-int8")``.

bitsandbytes quantises materialised weights, so the loader streams the float weights first and swaps the Linears
afterwards (our own int8/int4 formats are quantised while streaming instead)."""

import pytest
import torch

from nvlm.model import NVLM
from nvlm.quant import sqnr_db
from nvlm.testing import make_checkpoint

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-d", preset="tiny-d", seed=0, dtype=torch.float32)


# measured here on tiny-d text logits: nf4 15.5 dB, int8 35.7 dB
@pytest.mark.parametrize("name, module_type, min_db",
                         [("bnb-nf4", "Linear4bit", 12.0), ("bnb-int8", "Linear8bitLt", 30.0)])
def test_from_pretrained_with_bitsandbytes(checkpoint, name, module_type, min_db):
    ref = NVLM.from_pretrained(checkpoint, progress=False)
    model = NVLM.from_pretrained(checkpoint, quantization=name, progress=False)
    swapped = [m for m in model.modules() if type(m).__name__ == module_type]
    assert swapped, f"no bitsandbytes {module_type} after loading with quantization={name!r}"
    assert type(model.language_model.lm_head).__name__ == "Linear"          # lm_head kept, as for our formats
    ids = torch.randint(0, 900, (1, 12))
    with torch.inference_mode():
        db = sqnr_db(ref(ids).logits.float(), model(ids).logits.float())
    assert db > min_db, f"{name}: logits SQNR {db:.1f} dB vs the float model"
