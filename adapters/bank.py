"""The frozen adapter bank: N bottleneck adapters per encoder layer, stored as safetensors.

Every profile is a selection over this bank, so the bank must be bit-for-bit reproducible
(seeded), self-describing (metadata) and identifiable (``bank_id``, a hash of shapes, content
and the encoder it was built for). A profile trained on one bank is refused by any other.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xpeft.adapters.errors import BankError

BANK_FORMAT = "xpeft-bank/1"
TENSOR_NAMES = ("down", "down_bias", "up", "up_bias")


@dataclass
class AdapterBank:
    """Stacked adapter weights, layer-major so that one layer's bank is one contiguous block.

    Shapes: ``down (L, N, d, r)``, ``down_bias (L, N, r)``, ``up (L, N, r, d)``, ``up_bias (L, N, d)``.
    """

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor
    model_id: str
    init: str = "random"
    extra: dict[str, str] = field(default_factory=dict)
    bank_id: str = ""

    def __post_init__(self) -> None:
        L, N, d, r = self.down.shape
        expected = {
            "down_bias": (L, N, r),
            "up": (L, N, r, d),
            "up_bias": (L, N, d),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise BankError("bank_shape", f"bank tensor {name} has shape {got}, expected {shape}")
        if not self.bank_id:
            self.bank_id = compute_bank_id(self.tensors(), self.model_id)

    # -- shape accessors -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.down.shape[0]

    @property
    def num_adapters(self) -> int:
        return self.down.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[2]

    @property
    def bottleneck(self) -> int:
        return self.down.shape[3]

    @property
    def model_name(self) -> str:
        """How to load the encoder this bank was built for (alias, folder or hub name)."""
        return self.extra.get("model_name", "")

    @property
    def model_revision(self) -> str:
        """The hub revision (branch, tag or commit) the encoder is pinned to; empty when none."""
        return self.extra.get("model_revision", "")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AdapterBank:
        """A copy on another device / dtype. The id stays that of the stored (fp32) content."""
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}
        return AdapterBank(
            **moved, model_id=self.model_id, init=self.init, extra=dict(self.extra), bank_id=self.bank_id
        )

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": BANK_FORMAT,
            "bank_id": self.bank_id,
            "model_id": self.model_id,
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.hidden_size),
            "bottleneck": str(self.bottleneck),
            "num_adapters": str(self.num_adapters),
            "init": self.init,
        }
        meta.update(self.extra)
        return meta

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.tensors().items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=self.metadata())
        tmp.chmod(0o644)  # safetensors creates 0600; a server running as another user must read it
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> AdapterBank:
        path = Path(path)
        if not path.is_file():
            raise BankError("bank_not_found", f"no bank file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in TENSOR_NAMES}
        except BankError:
            raise
        except Exception as exc:  # safetensors raises several types for a bad header or missing key
            raise BankError("bank_invalid", f"{path} is not a readable xpeft bank: {exc}") from exc
        if meta.get("format") != BANK_FORMAT:
            raise BankError(
                "bank_invalid", f"{path} has format {meta.get('format')!r}, expected {BANK_FORMAT}"
            )
        extra = {k: v for k, v in meta.items() if k not in _CORE_META}
        bank = cls(**tensors, model_id=meta["model_id"], init=meta.get("init", "unknown"), extra=extra)
        if bank.bank_id != meta.get("bank_id"):
            raise BankError(
                "bank_checksum",
                f"{path}: content hashes to {bank.bank_id} but metadata says {meta.get('bank_id')}",
            )
        return bank


_CORE_META = {
    "format",
    "bank_id",
    "model_id",
    "num_layers",
    "hidden_size",
    "bottleneck",
    "num_adapters",
    "init",
}


def compute_bank_id(tensors: dict[str, torch.Tensor], model_id: str) -> str:
    """Hash of the encoder id, every tensor's name, shape and fp32 bytes: 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    h.update(model_id.encode())
    for name in TENSOR_NAMES:
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def create_random_bank(
    num_layers: int,
    hidden_size: int,
    model_id: str,
    num_adapters: int = 100,
    reduction_factor: int = 16,
    seed: int = 0,
    init_scale: float = 1.0,
    model_name: str = "",
    model_revision: str = "",
) -> AdapterBank:
    """A seeded random bank (the lottery-ticket setting).

    Down projections are N(0, 1/d) and up projections N(0, 1/r), both times ``init_scale``:
    each adapter's output then has roughly the scale of its input, so a selection of adapters
    moves the hidden states by a measurable amount (docs/ARCHITECTURE.md gives the numbers).
    The usual near-zero adapter init would make every selection look the same.
    Down biases are N(0, 1/4) so that the ReLU patterns differ between adapters; up biases are 0.
    """
    if hidden_size % reduction_factor:
        raise BankError("bank_shape", f"hidden size {hidden_size} is not divisible by {reduction_factor}")
    r = hidden_size // reduction_factor
    g = torch.Generator().manual_seed(seed)
    L, N, d = num_layers, num_adapters, hidden_size
    down = torch.randn(L, N, d, r, generator=g) * (init_scale / math.sqrt(d))
    up = torch.randn(L, N, r, d, generator=g) * (init_scale / math.sqrt(r))
    down_bias = torch.randn(L, N, r, generator=g) * 0.5
    up_bias = torch.zeros(L, N, d)
    return AdapterBank(
        down,
        down_bias,
        up,
        up_bias,
        model_id=model_id,
        init="random",
        extra={
            "seed": str(seed),
            "init_scale": str(init_scale),
            "model_name": model_name,
            "reduction_factor": str(reduction_factor),
            **({"model_revision": model_revision} if model_revision else {}),
        },
    )


def stack_adapters(
    adapters: Sequence[dict[str, torch.Tensor]], model_id: str, init: str, model_name: str = ""
) -> AdapterBank:
    """Stack single adapters (each ``down (L,d,r)`` ... ``up_bias (L,d)``) into a bank."""
    if not adapters:
        raise BankError("bank_shape", "no adapters to stack")
    first = {k: tuple(v.shape) for k, v in adapters[0].items()}
    for i, a in enumerate(adapters):
        shapes = {k: tuple(v.shape) for k, v in a.items()}
        if shapes != first:
            raise BankError("bank_shape", f"adapter {i} has shapes {shapes}, adapter 0 has {first}")
    down, down_bias, up, up_bias = (
        torch.stack([a[name].float() for a in adapters], dim=1) for name in TENSOR_NAMES
    )
    return AdapterBank(
        down=down,
        down_bias=down_bias,
        up=up,
        up_bias=up_bias,
        model_id=model_id,
        init=init,
        extra={"sources": str(len(adapters)), "model_name": model_name},
    )
