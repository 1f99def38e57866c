"""The ``.xpm`` profile file: the bytes a user uploads, Redis stores, and the server loads.

Layout (all integers little-endian)::

    magic  b"\\x89XPM"          4 bytes (the high bit catches 7-bit transfers, as in PNG)
    format_version             u16
    header_length              u16
    header                     JSON, UTF-8: kind, ids, shapes, k, labels, max_length, meta
    payload                    the kind's sections (:func:`sections`), in that order
    crc32                      u32 over everything before it

Payload sections per kind (bits: bitarray big-endian, padded to a byte; floats: fp16)::

    hard            mask_down, mask_up: L*N bits each
                    version 2 may add gains (L floats: one per layer) and values (2*L*k floats:
                    the weight of each selected adapter, row by row in index order)
    soft            weights_down, weights_up: L*N floats each
    single_adapter  down (L,d,r), down_bias (L,r), up (L,r,d), up_bias (L,d)
    head_only       nothing
    every kind      head_weight (C,d), head_bias (C)

Version 2 adds three optional header fields for hard profiles: ``scale_power`` (a selected
adapter weighs ``1 / k**p``), ``gains`` and ``values`` (booleans: those sections are present). A
profile that uses none of them is written as version 1, byte for byte as before, so servers that
only read version 1 keep serving it; both versions are read. Framing and header checks live in
:mod:`xpeft.profiles.format_header`; this module owns the sections, the one table of what each
kind stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bitarray import bitarray

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.profiles.format_header import (
    ERROR_CODES,
    FORMAT_VERSION,
    KINDS_BY_WIRE_NAME,
    READ_VERSIONS,
    WIRE_NAMES,
    ProfileFormatError,
    ProfileInfo,
    frame,
    parse_header,
    split,
)
from xpeft.profiles.profile import Profile, ProfileKind
from xpeft.profiles.train_config import MAX_GAIN

__all__ = [
    "ERROR_CODES",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "ProfileFormatError",
    "ProfileInfo",
    "check_compatible",
    "decode",
    "encode",
    "load",
    "read_info",
    "save",
    "sections",
]


@dataclass(frozen=True)
class Section:
    """One payload section: its name, how it is stored, and its shape."""

    name: str
    bits: bool  # True: packed booleans; False: fp16 numbers
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = math.prod(self.shape)
        return (count + 7) // 8 if self.bits else 2 * count


def sections(
    kind: ProfileKind,
    L: int,
    N: int,
    d: int,
    r: int,
    C: int,
    k: int,
    gains: bool = False,
    values: bool = False,
) -> list[Section]:
    """What a profile of ``kind`` stores, in file order: the one place that says it."""
    out: list[Section] = []
    if kind is ProfileKind.HARD:
        out = [Section("mask_down", True, (L, N)), Section("mask_up", True, (L, N))]
        if gains:
            out.append(Section("gains", False, (L,)))
        if values:
            out.append(Section("values", False, (2, L, k)))
    elif kind is ProfileKind.SOFT:
        out = [Section("weights_down", False, (L, N)), Section("weights_up", False, (L, N))]
    elif kind is ProfileKind.SINGLE_ADAPTER:
        shapes = {"down": (L, d, r), "down_bias": (L, r), "up": (L, r, d), "up_bias": (L, d)}
        out = [Section(name, False, shapes[name]) for name in TENSOR_NAMES]
    return out + [Section("head_weight", False, (C, d)), Section("head_bias", False, (C,))]


# -- writing ---------------------------------------------------------------------------------
def _fp16(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2").tobytes()


def _bits(mask: torch.Tensor) -> bytes:
    bits = bitarray(endian="big")
    bits.pack(mask.detach().to("cpu", torch.bool).flatten().numpy().tobytes())
    return bits.tobytes()


def _stored(profile: Profile, name: str) -> torch.Tensor:
    """The tensor a section stores, as the profile holds it."""
    if name == "values":  # only the selected positions: (2, L, k) in index order
        assert profile.values is not None
        return profile.values[torch.stack(profile.masks())].view(2, profile.num_layers, profile.k)
    if name in TENSOR_NAMES:
        return profile.adapter_tensors()[name]
    tensor = getattr(profile, name)
    if tensor is None:
        raise ProfileFormatError("bad_payload", f"a {profile.kind.value} profile needs {name}")
    return tensor


def _v2_fields(profile: Profile) -> dict:
    """The version-2 header fields a hard profile needs (none: it is written as version 1)."""
    if profile.kind is not ProfileKind.HARD:
        return {}
    fields: dict = {}
    if profile.scale_power != 1.0:
        fields["scale_power"] = float(profile.scale_power)
    if profile.gains is not None:
        fields["gains"] = True
    if profile.values is not None:
        fields["values"] = True
    return fields


def encode(profile: Profile) -> bytes:
    """Serialise a profile. The result decodes back to the same profile (tensors rounded to fp16)."""
    header: dict = {
        "kind": WIRE_NAMES[profile.kind],
        "bank_id": profile.bank_id,
        "model_id": profile.model_id,
        "L": profile.num_layers,
        "N": profile.num_adapters,
        "d": profile.hidden_size,
        "r": profile.bottleneck,
        "k": profile.k,
        "labels": list(profile.labels),
        "max_length": profile.max_length,
    }
    if profile.meta:
        header["meta"] = dict(profile.meta)
    extras = _v2_fields(profile)
    header.update(extras)
    payload = b"".join((_bits if s.bits else _fp16)(_stored(profile, s.name)) for s in _sections_of(header))
    return frame(2 if extras else 1, header, payload)


def _sections_of(h: dict) -> list[Section]:
    """The sections a header declares (``kind`` as a :class:`ProfileKind` or its wire name)."""
    kind = h["kind"] if isinstance(h["kind"], ProfileKind) else KINDS_BY_WIRE_NAME[h["kind"]]
    return sections(
        kind,
        h["L"],
        h["N"],
        h["d"],
        h["r"],
        len(h["labels"]),
        h["k"],
        h.get("gains", False),
        h.get("values", False),
    )


# -- reading ---------------------------------------------------------------------------------
def _floats(raw: bytes, shape: tuple[int, ...], name: str) -> torch.Tensor:
    t = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32)).view(*shape)
    if not torch.isfinite(t).all():
        raise ProfileFormatError("bad_payload", f"{name} holds NaN or infinite values")
    return t


def _mask(raw: bytes, shape: tuple[int, ...], k: int, name: str) -> torch.Tensor:
    L, N = shape
    bits = bitarray(endian="big")
    bits.frombytes(raw)
    if bits[L * N :].any():
        raise ProfileFormatError("bad_payload", f"{name} has bits set in its padding")
    mask = torch.from_numpy(np.frombuffer(bits[: L * N].unpack(), dtype=np.bool_).copy()).view(L, N)
    counts = mask.sum(dim=1)
    if not bool((counts == k).all()):
        raise ProfileFormatError(
            "bad_payload", f"{name} rows select {counts.tolist()} adapters, expected k={k}"
        )
    return mask


def _read(data: bytes) -> tuple[ProfileInfo, bytes]:
    version, raw_header, payload, crc_ok = split(data)
    try:
        h = parse_header(raw_header, version)
        need = sum(s.nbytes for s in _sections_of(h))
    except ProfileFormatError:
        if crc_ok:
            raise
        h, need = {}, 0
    if not crc_ok:
        if h and len(payload) < need:
            raise ProfileFormatError(
                "truncated", f"payload has {len(payload)} bytes, the header needs {need}"
            )
        raise ProfileFormatError("checksum_mismatch", "crc32 does not match the stored checksum")
    if len(payload) != need:
        raise ProfileFormatError("bad_payload", f"payload has {len(payload)} bytes, the header needs {need}")
    info = ProfileInfo(
        format_version=version,
        kind=h["kind"].value,
        bytes=len(data),
        num_layers=h["L"],
        num_adapters=h["N"],
        hidden_size=h["d"],
        bottleneck=h["r"],
        k=h["k"],
        bank_id=h["bank_id"],
        model_id=h["model_id"],
        labels=list(h["labels"]),
        max_length=h["max_length"],
        meta=dict(h["meta"]),
        scale_power=float(h.get("scale_power", 1.0)),
        gains=h.get("gains", False),
        values=h.get("values", False),
    )
    return info, payload


def read_info(data: bytes) -> ProfileInfo:
    """Validate framing, checksum and header; return the metadata without decoding tensors."""
    return _read(data)[0]


def _tensors(info: ProfileInfo, payload: bytes) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    i = info
    for s in sections(
        i.profile_kind,
        i.num_layers,
        i.num_adapters,
        i.hidden_size,
        i.bottleneck,
        len(i.labels),
        i.k,
        i.gains,
        i.values,
    ):
        raw = payload[offset : offset + s.nbytes]
        offset += s.nbytes
        out[s.name] = _mask(raw, s.shape, info.k, s.name) if s.bits else _floats(raw, s.shape, s.name)
    return out


def decode(data: bytes, bank: AdapterBank | None = None) -> Profile:
    """Parse and validate a profile file; with ``bank``, also refuse one trained for another bank."""
    info, payload = _read(data)
    t = _tensors(info, payload)
    kind = info.profile_kind
    profile = Profile(
        kind=kind,
        bank_id=info.bank_id,
        model_id=info.model_id,
        num_layers=info.num_layers,
        num_adapters=info.num_adapters,
        hidden_size=info.hidden_size,
        bottleneck=info.bottleneck,
        labels=info.labels,
        k=info.k,
        max_length=info.max_length,
        meta=info.meta,
        head_weight=t["head_weight"],
        head_bias=t["head_bias"],
    )
    if kind is ProfileKind.HARD:
        profile.mask_down, profile.mask_up = t["mask_down"], t["mask_up"]
        profile.scale_power = info.scale_power
        if "gains" in t:
            if not bool(((t["gains"] > 0) & (t["gains"] <= MAX_GAIN)).all()):
                raise ProfileFormatError("bad_payload", f"gains must lie in (0, {MAX_GAIN:g}]")
            profile.gains = t["gains"]
        if "values" in t:
            values = torch.zeros(2, info.num_layers, info.num_adapters)
            values[torch.stack(profile.masks())] = t["values"].flatten()
            profile.values = values
    elif kind is ProfileKind.SOFT:
        ones = torch.ones(info.num_layers)
        for name in ("weights_down", "weights_up"):
            w = t[name]
            if bool((w < 0).any()) or not torch.allclose(w.sum(dim=1), ones, atol=2e-2):
                raise ProfileFormatError("bad_payload", f"{name} rows are not probability vectors")
        profile.weights_down, profile.weights_up = t["weights_down"], t["weights_up"]
    elif kind is ProfileKind.SINGLE_ADAPTER:
        profile.adapter = {name: t[name] for name in TENSOR_NAMES}
    if bank is not None:
        check_compatible(profile, bank)
    return profile


def check_compatible(profile: Profile | ProfileInfo, bank: AdapterBank) -> None:
    """Refuse a profile made for another bank (bank kinds) or another encoder / shape (all kinds)."""
    kind = ProfileKind(profile.kind)
    if profile.model_id != bank.model_id:
        raise ProfileFormatError(
            "bank_mismatch",
            f"profile was trained for encoder {profile.model_id}, this bank serves {bank.model_id}",
        )
    if kind.uses_bank and profile.bank_id != bank.bank_id:
        raise ProfileFormatError(
            "bank_mismatch",
            f"profile was trained on bank {profile.bank_id}, the bank in use is {bank.bank_id}",
        )
    got: tuple[int, ...] = (profile.num_layers, profile.hidden_size)
    want: tuple[int, ...] = (bank.num_layers, bank.hidden_size)
    if kind.uses_bank:
        got += (profile.num_adapters, profile.bottleneck)
        want += (bank.num_adapters, bank.bottleneck)
    elif kind is ProfileKind.SINGLE_ADAPTER:
        got += (profile.bottleneck,)
        want += (bank.bottleneck,)
    if got != want:
        raise ProfileFormatError("bank_mismatch", f"profile shapes {got} do not fit the bank's {want}")


def save(profile: Profile, path: str | Path) -> int:
    data = encode(profile)
    Path(path).write_bytes(data)
    return len(data)


def load(path: str | Path, bank: AdapterBank | None = None) -> Profile:
    return decode(Path(path).read_bytes(), bank)
