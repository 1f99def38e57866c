"""A copy of the encoder small enough to carry to a machine without network (see gpu.sh)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xpeft.adapters.encoder import default_model_dir
from xpeft.adapters.errors import XPeftError


def pack_model(out: str | Path, model: str = "minilm", dtype: torch.dtype = torch.float16) -> int:
    """Copy an encoder folder with its float weights stored in ``dtype``; returns the copy's bytes.

    Everything but ``model.safetensors`` is copied unchanged, so the copy loads wherever the
    original does; ``load_encoder`` computes in fp32 again (the values keep the fp16 rounding).
    The encoder's content id changes with the rounding, so banks built on the copy get their own ids.
    """
    source = default_model_dir() if model in ("minilm", "default") else Path(model)
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise XPeftError("bad_argument", f"{source} has no model.safetensors to pack")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = dict(f.metadata() or {})
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={**meta, "xpeft_packed": str(dtype)})
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
