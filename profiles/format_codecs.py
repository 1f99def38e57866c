"""How each ``.xpm`` payload section is stored: packed bits, fp16, int8, or packed indices.

:func:`pack` writes a tensor as its section says; :func:`unpack` reads it back and refuses any
value the writer could not have produced (bits in the padding, NaN, an int8 -128, indices out of
order or out of range), so a decoded profile holds only canonical data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from bitarray import bitarray

from xpeft.profiles.format_errors import ProfileFormatError

CODECS = ("bits", "f16", "i8", "index")


@dataclass(frozen=True)
class Section:
    """One payload section: its name, how it is stored, and its shape.

    ``codec``: ``bits`` (packed booleans), ``f16``, ``i8``, or ``index`` (rows of strictly
    ascending integers below ``bound``, each in :func:`index_width` bits)."""

    name: str
    codec: str
    shape: tuple[int, ...]
    bound: int = 0  # index: every value is below it

    @property
    def nbits(self) -> int:
        count = math.prod(self.shape)
        per = {"bits": 1, "f16": 16, "i8": 8, "index": index_width(self.bound)}[self.codec]
        return count * per

    @property
    def nbytes(self) -> int:
        return (self.nbits + 7) // 8


def index_width(bound: int) -> int:
    """Bits per stored index when every index is below ``bound``."""
    return max(1, (bound - 1).bit_length())


def unit_selection(name: str, L: int, P: int, k: int) -> Section:
    """k units of each layer out of P: as ``L*P`` bits or ``L*k`` indices, whichever is smaller
    (ties: bits), so the header alone says which."""
    if k * index_width(P) >= P:
        return Section(name, "bits", (L, P))
    return Section(name, "index", (L, k), bound=P)


# -- writing ---------------------------------------------------------------------------------------
def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row as int8 times one fp16 step: ``(q (rows, n) int8, step (rows,))``, with
    ``q * step`` the values a file holds. Applying it to its own result changes nothing."""
    v = values.detach().to("cpu", torch.float32)
    peak = v.abs().amax(dim=-1)
    step = torch.where(peak > 0, peak / 127, torch.ones_like(peak)).to(torch.float16).float()
    q = torch.round(v / step.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, step


def _packed(flat_bits: np.ndarray) -> bytes:
    bits = bitarray(endian="big")
    bits.pack(flat_bits.astype(np.bool_).tobytes())
    return bits.tobytes()


def pack(section: Section, tensor: torch.Tensor) -> bytes:
    t = tensor.detach().to("cpu")
    if section.codec == "f16":
        return t.to(torch.float16).contiguous().numpy().astype("<f2").tobytes()
    if section.codec == "i8":
        return t.to(torch.int8).contiguous().numpy().tobytes()
    if section.codec == "bits":
        return _packed(t.to(torch.bool).flatten().numpy())
    width = index_width(section.bound)
    values = t.to(torch.int64).flatten().numpy().astype(">u8")
    bits = np.unpackbits(values.view(np.uint8).reshape(-1, 8), axis=1)[:, 64 - width :]
    return _packed(bits.flatten())


# -- reading ---------------------------------------------------------------------------------------
def _unpacked(raw: bytes, nbits: int, name: str) -> np.ndarray:
    bits = bitarray(endian="big")
    bits.frombytes(raw)
    if bits[nbits:].any():
        raise ProfileFormatError("bad_payload", f"{name} has bits set in its padding")
    return np.frombuffer(bits[:nbits].unpack(), dtype=np.bool_)


def unpack(section: Section, raw: bytes, k: int | None = None) -> torch.Tensor:
    """The section's tensor; ``bits`` rows must hold exactly ``k`` set bits when ``k`` is given."""
    name, shape = section.name, section.shape
    if section.codec == "f16":
        t = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32)).view(*shape)
        if not torch.isfinite(t).all():
            raise ProfileFormatError("bad_payload", f"{name} holds NaN or infinite values")
        return t
    if section.codec == "i8":
        t = torch.from_numpy(np.frombuffer(raw, dtype=np.int8).astype(np.int64)).view(*shape)
        if bool((t == -128).any()):
            raise ProfileFormatError("bad_payload", f"{name} holds -128 (int8 rows are symmetric)")
        return t
    flat = _unpacked(raw, section.nbits, name)
    if section.codec == "bits":
        mask = torch.from_numpy(flat.copy()).view(*shape)
        counts = mask.sum(dim=-1)
        if k is not None and not bool((counts == k).all()):
            raise ProfileFormatError("bad_payload", f"{name} rows select {counts.tolist()}, expected k={k}")
        return mask
    width = index_width(section.bound)
    digits = np.zeros((math.prod(shape), 64), dtype=np.uint8)
    digits[:, 64 - width :] = flat.reshape(-1, width)
    values = torch.from_numpy(np.packbits(digits, axis=1).view(">u8").astype(np.int64).reshape(shape))
    if bool((values >= section.bound).any()) or not bool((values[..., 1:] > values[..., :-1]).all()):
        raise ProfileFormatError(
            "bad_payload", f"{name} rows must be ascending indices below {section.bound}"
        )
    return values
