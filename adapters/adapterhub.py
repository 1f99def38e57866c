"""Import Pfeiffer (sequential bottleneck) adapters saved by the AdapterHub ``adapters`` library.

A saved adapter folder holds ``adapter_config.json`` and ``pytorch_adapter.bin`` (or a
``.safetensors`` file) with that library's parameter names::

    <prefix>encoder.layer.<i>.output.adapters.<name>.adapter_down.0.weight   (r, d)
    <prefix>encoder.layer.<i>.output.adapters.<name>.adapter_down.0.bias     (r,)
    <prefix>encoder.layer.<i>.output.adapters.<name>.adapter_up.weight       (d, r)
    <prefix>encoder.layer.<i>.output.adapters.<name>.adapter_up.bias         (d,)

``nn.Linear`` stores ``(out, in)``, so both matrices are transposed into our ``x @ W`` layout.
Only the weights are taken: xpeft applies them at its own (Pfeiffer) position, before the
residual LayerNorm, without the library's optional extra LayerNorms (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from xpeft.adapters.bank import AdapterBank, stack_adapters
from xpeft.adapters.errors import BankError

CONFIG_NAME = "adapter_config.json"
_KEY = re.compile(r"layer\.(\d+)\.output\.adapters\.([^.]+)\.adapter_(down\.0|up)\.(weight|bias)$")


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    bin_path = folder / "pytorch_adapter.bin"
    if bin_path.is_file():
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return load_file(str(safetensors[0]))
    raise BankError("adapter_invalid", f"{folder} has neither pytorch_adapter.bin nor a .safetensors file")


def read_adapterhub(folder: str | Path, num_layers: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """One saved adapter as ``down (L,d,r)``, ``down_bias (L,r)``, ``up (L,r,d)``, ``up_bias (L,d)``.

    Layers the adapter leaves out (the library's ``leave_out``) get an all-zero adapter, which
    adds nothing.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise BankError("adapter_invalid", f"{folder} has no {CONFIG_NAME}")
    try:
        saved = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BankError("adapter_invalid", f"{config_path} is not JSON: {exc}") from exc
    config = saved.get("config", saved)
    if config.get("mh_adapter"):
        raise BankError(
            "adapter_invalid",
            f"{folder}: adapters after the attention block (mh_adapter) are "
            "not supported; only Pfeiffer / sequential bottleneck output adapters",
        )
    act = str(config.get("non_linearity", "relu")).lower()
    if act != "relu":
        raise BankError(
            "adapter_invalid", f"{folder}: non_linearity {act!r} is not supported (xpeft uses relu)"
        )
    if saved.get("hidden_size", hidden_size) != hidden_size:
        raise BankError(
            "bank_shape", f"{folder}: adapter hidden size {saved['hidden_size']} != encoder {hidden_size}"
        )

    weights = _load_weights(folder)
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, value in weights.items():
        m = _KEY.search(key)
        if m:
            found[(int(m.group(1)), m.group(3), m.group(4))] = value.float()
    if not found:
        raise BankError("adapter_invalid", f"{folder}: no output-adapter weights with the library's names")
    layer_of_any = next(iter(found))[0]
    r = found[(layer_of_any, "down.0", "weight")].shape[0]
    L, d = num_layers, hidden_size
    out = {
        "down": torch.zeros(L, d, r),
        "down_bias": torch.zeros(L, r),
        "up": torch.zeros(L, r, d),
        "up_bias": torch.zeros(L, d),
    }
    for (layer, part, kind), value in found.items():
        if layer >= L:
            raise BankError("bank_shape", f"{folder}: weights for layer {layer}, the encoder has {L} layers")
        name = {
            ("down.0", "weight"): "down",
            ("down.0", "bias"): "down_bias",
            ("up", "weight"): "up",
            ("up", "bias"): "up_bias",
        }[(part, kind)]
        tensor = value.T if kind == "weight" else value
        if tuple(tensor.shape) != tuple(out[name][layer].shape):
            raise BankError(
                "bank_shape",
                f"{folder}: layer {layer} {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(out[name][layer].shape)}",
            )
        out[name][layer] = tensor
    return out


def import_adapterhub(
    folders: list[str | Path], model_id: str, num_layers: int, hidden_size: int, model_name: str = ""
) -> AdapterBank:
    """A bank whose N adapters are the given AdapterHub folders, in order."""
    adapters = [read_adapterhub(f, num_layers, hidden_size) for f in folders]
    return stack_adapters(adapters, model_id=model_id, init="adapterhub", model_name=model_name)
