"""Fixtures shared by the reliability tests: one tiny NVLM-D checkpoint per session and private copies to damage."""

import shutil

import pytest

from nvlm.testing import make_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A pristine tiny-d checkpoint in the published layout (3 shards + index + config + tokenizer). Never modify."""
    return make_checkpoint(tmp_path_factory.mktemp("reliability") / "tiny-d", seed=3)


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    """A private copy of the checkpoint, free to damage."""
    return shutil.copytree(checkpoint, tmp_path / "ckpt")
