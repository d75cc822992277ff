"""Small helpers for the reliability tests (checkpoint surgery, file digests)."""

import hashlib
import json

from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def weight_map(folder):
    return json.loads((folder / INDEX).read_text())["weight_map"]


def rewrite_shard(folder, key, fn):
    """Apply ``fn(tensors)`` to the shard holding ``key`` and save it back; returns the shard's file name."""
    name = weight_map(folder)[key]
    tensors = load_file(str(folder / name))
    fn(tensors)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return name


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def tree_digest(folder) -> dict:
    """``{relative path: sha256}`` of every file under ``folder`` (to show a failed operation changed nothing)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
