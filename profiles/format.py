"""The ``.xpm`` profile file: the bytes a user uploads, Redis stores, and the server loads.

Layout (all integers little-endian)::

    magic  b"\\x89XPM"          4 bytes (the high bit catches 7-bit transfers, as in PNG)
    format_version             u16
    header_length              u16
    header                     JSON, UTF-8: kind, ids, shapes, k, labels, max_length, meta
    payload                    per kind, fixed order, sizes follow from the header:
        hard       mask_down, mask_up: L*N bits each, bitarray big-endian, padded to a byte;
                   version 2 may add gains (2*L fp16: down, then up, per layer) and values
                   (2*L*k fp16: the weight of each selected adapter, row by row in index order)
        soft       weights_down, weights_up: L*N fp16 each
        adapter    down (L,d,r), down_bias (L,r), up (L,r,d), up_bias (L,d): fp16
        head_only  nothing
        all kinds  head_weight (C,d), head_bias (C): fp16
    crc32                      u32 over everything before it

Sizes are computed from the header and checked against the actual length *before* anything is
allocated, so a file that declares huge shapes is refused cheaply.

Version 2 adds three optional header fields for hard profiles, ``scale_power`` (a selected adapter
weighs ``1 / k**p``), ``gains`` and ``values`` (booleans: the sections above are present). A
profile that uses none of them is written as version 1, byte for byte as before, so servers that
only read version 1 keep serving it; both versions are read.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from bitarray import bitarray

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.profiles.profile import Profile, ProfileKind

MAGIC = b"\x89XPM"
FORMAT_VERSION = 2  # the newest version this build writes
READ_VERSIONS = (1, 2)
MAX_GAIN = 1024.0  # a gain beyond this would blow the hidden states up; no training gets near it
_PREFIX = struct.Struct("<4sHH")
_CRC = struct.Struct("<I")
# Bounds on declared shapes: far above any real encoder, far below anything that hurts.
LIMITS = {"L": 128, "N": 65536, "d": 16384, "r": 16384, "C": 4096}
MAX_META_ITEMS = 32


class ProfileFormatError(XPeftError):
    """A profile file that cannot be used. ``code`` is one of :data:`ERROR_CODES`."""


ERROR_CODES = (
    "truncated",  # shorter than its own header says
    "bad_magic",  # not an .xpm file
    "unsupported_version",  # written by a newer (or unknown) format version
    "checksum_mismatch",  # bytes changed after writing
    "bad_header",  # header is not the JSON this version writes
    "bad_payload",  # sizes or values inconsistent with the header (k-hot rows, NaN, ...)
    "bank_mismatch",  # trained on another bank (or another encoder)
)


@dataclass(frozen=True)
class ProfileInfo:
    """What ``xpeft info`` and ``GET /profiles/{id}`` show: the header, without the tensors."""

    format_version: int
    kind: str
    bytes: int
    num_layers: int
    num_adapters: int
    hidden_size: int
    bottleneck: int
    k: int
    bank_id: str
    model_id: str
    labels: list[str]
    max_length: int
    meta: dict[str, str]
    scale_power: float = 1.0
    gains: bool = False
    values: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- writing ---------------------------------------------------------------------------------
def _fp16(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2").tobytes()


def _bits(mask: torch.Tensor) -> bytes:
    bits = bitarray(endian="big")
    bits.pack(mask.detach().to("cpu", torch.bool).flatten().numpy().tobytes())
    return bits.tobytes()


def encode(profile: Profile) -> bytes:
    """Serialise a profile. The result decodes back to the same profile (tensors rounded to fp16)."""
    header = {
        "kind": profile.kind.value,
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
    extras = _hard_extras(profile)
    header.update(extras)
    version = 2 if extras else 1
    raw_header = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw_header) > 0xFFFF:
        raise ProfileFormatError("bad_header", f"header of {len(raw_header)} bytes exceeds 65535")
    parts = [_PREFIX.pack(MAGIC, version, len(raw_header)), raw_header]
    kind = profile.kind
    if kind is ProfileKind.HARD:
        parts += [_bits(profile.mask_down), _bits(profile.mask_up)]
        if profile.gains is not None:
            parts.append(_fp16(profile.gains))
        if profile.values is not None:
            parts.append(_fp16(_selected_values(profile)))
    elif kind is ProfileKind.SOFT:
        parts += [_fp16(profile.weights_down), _fp16(profile.weights_up)]
    elif kind is ProfileKind.ADAPTER:
        parts += [_fp16(t) for t in profile.adapter_tensors().values()]
    parts += [_fp16(profile.head_weight), _fp16(profile.head_bias)]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def _hard_extras(profile: Profile) -> dict:
    """The version-2 header fields a hard profile needs (none: it is written as version 1)."""
    if profile.kind is not ProfileKind.HARD:
        return {}
    extras: dict = {}
    if profile.scale_power != 1.0:
        extras["scale_power"] = float(profile.scale_power)
    if profile.gains is not None:
        extras["gains"] = True
    if profile.values is not None:
        extras["values"] = True
    return extras


def _selected_values(profile: Profile) -> torch.Tensor:
    """``values (2, L, N)`` at the masks' selected positions: ``(2, L, k)`` in index order."""
    assert profile.values is not None and profile.mask_down is not None and profile.mask_up is not None
    masks = torch.stack([profile.mask_down, profile.mask_up])
    return profile.values[masks].view(2, profile.num_layers, profile.k)


# -- reading ---------------------------------------------------------------------------------
def _section_sizes(
    kind: ProfileKind,
    L: int,
    N: int,
    d: int,
    r: int,
    C: int,
    k: int = 0,
    gains: bool = False,
    values: bool = False,
) -> list[tuple[str, int]]:
    mask_bytes = (L * N + 7) // 8
    sections: list[tuple[str, int]] = []
    if kind is ProfileKind.HARD:
        sections = [("mask_down", mask_bytes), ("mask_up", mask_bytes)]
        sections += [("gains", 2 * 2 * L)] if gains else []
        sections += [("values", 2 * 2 * L * k)] if values else []
    elif kind is ProfileKind.SOFT:
        sections = [("weights_down", 2 * L * N), ("weights_up", 2 * L * N)]
    elif kind is ProfileKind.ADAPTER:
        sections = [
            ("down", 2 * L * d * r),
            ("down_bias", 2 * L * r),
            ("up", 2 * L * r * d),
            ("up_bias", 2 * L * d),
        ]
    return sections + [("head_weight", 2 * C * d), ("head_bias", 2 * C)]


def _header_sizes(h: dict) -> list[tuple[str, int]]:
    """The payload sections a parsed header declares, in file order."""
    return _section_sizes(
        ProfileKind(h["kind"]),
        h["L"],
        h["N"],
        h["d"],
        h["r"],
        len(h["labels"]),
        h["k"],
        h.get("gains", False),
        h.get("values", False),
    )


def _parse_extras(header: dict, version: int) -> None:
    """Version-2 fields: only in version 2, only for hard profiles, and of the right types."""
    present = [key for key in ("scale_power", "gains", "values") if key in header]
    if not present:
        return
    if version < 2 or header["kind"] != ProfileKind.HARD.value:
        raise ProfileFormatError("bad_header", f"{present} need format version 2 and a hard profile")
    power = header.get("scale_power", 1.0)
    if not isinstance(power, int | float) or isinstance(power, bool) or not 0.0 <= power <= 4.0:
        raise ProfileFormatError("bad_header", f"scale_power={power!r} is not a number in [0, 4]")
    for key in ("gains", "values"):
        if not isinstance(header.get(key, False), bool):
            raise ProfileFormatError("bad_header", f"{key} must be a JSON boolean")


def _parse_header(raw: bytes, version: int = 1) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileFormatError("bad_header", f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProfileFormatError("bad_header", "header is not a JSON object")
    try:
        ProfileKind(header.get("kind"))
    except ValueError as exc:
        kinds = [k.value for k in ProfileKind]
        raise ProfileFormatError(
            "bad_header", f"unknown kind {header.get('kind')!r}; one of {kinds}"
        ) from exc
    if not isinstance(header.get("labels"), list):
        raise ProfileFormatError("bad_header", "labels must be a JSON list of strings")
    for key, bound in LIMITS.items():
        value = header.get(key) if key != "C" else len(header["labels"])
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound:
            raise ProfileFormatError("bad_header", f"{key}={value!r} is not an integer in [1, {bound}]")
    labels = header["labels"]
    if len(labels) < 2 or not all(isinstance(x, str) and 0 < len(x) <= 256 for x in labels):
        raise ProfileFormatError("bad_header", "labels must be 2 or more non-empty strings of <= 256 chars")
    if len(set(labels)) != len(labels):
        raise ProfileFormatError("bad_header", "labels must be distinct")
    for key in ("bank_id", "model_id"):
        if not isinstance(header.get(key), str) or not 0 < len(header[key]) <= 128:
            raise ProfileFormatError("bad_header", f"{key} must be a non-empty string")
    if not isinstance(header.get("k"), int) or isinstance(header.get("k"), bool):
        raise ProfileFormatError("bad_header", "k must be an integer")
    kind = ProfileKind(header["kind"])
    if kind is ProfileKind.HARD and not 1 <= header["k"] <= header["N"]:
        raise ProfileFormatError("bad_header", f"hard profile needs 1 <= k <= N, got k={header['k']}")
    max_length = header.get("max_length", 128)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= 65536:
        raise ProfileFormatError("bad_header", f"max_length={max_length!r} is out of range")
    meta = header.get("meta", {})
    if (
        not isinstance(meta, dict)
        or len(meta) > MAX_META_ITEMS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ProfileFormatError("bad_header", f"meta must be at most {MAX_META_ITEMS} string pairs")
    _parse_extras(header, version)
    return header


def _split_prefix(data: bytes) -> tuple[int, bytes, bytes]:
    """Check framing, magic, version and checksum; return (version, raw header, payload)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProfileFormatError("bad_magic", "profile data must be bytes")
    data = bytes(data)
    if len(data) < _PREFIX.size + _CRC.size:
        raise ProfileFormatError("truncated", f"{len(data)} bytes is shorter than any profile file")
    magic, version, header_length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProfileFormatError("bad_magic", "not an xpeft profile (.xpm) file: wrong magic bytes")
    if version not in READ_VERSIONS:
        raise ProfileFormatError(
            "unsupported_version", f"format version {version}; this build reads versions {READ_VERSIONS}"
        )
    if len(data) < _PREFIX.size + header_length + _CRC.size:
        raise ProfileFormatError("truncated", f"{len(data)} bytes cannot hold the declared header")
    body, (stored_crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    header_end = _PREFIX.size + header_length
    actual_crc = zlib.crc32(body)
    if actual_crc != stored_crc:
        # Checked before the header is trusted, but a short file is reported as truncated.
        try:
            header = _parse_header(body[_PREFIX.size : header_end], version)
            need = sum(n for _, n in _header_sizes(header))
            if len(body) - header_end < need:
                raise ProfileFormatError(
                    "truncated", f"payload has {len(body) - header_end} bytes, the header needs {need}"
                )
        except ProfileFormatError as exc:
            if exc.code == "truncated":
                raise
        raise ProfileFormatError(
            "checksum_mismatch", f"crc32 {actual_crc:08x} does not match the stored {stored_crc:08x}"
        )
    return version, body[_PREFIX.size : header_end], body[header_end:]


def _floats(raw: bytes, shape: tuple[int, ...], name: str) -> torch.Tensor:
    t = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32)).view(*shape)
    if not torch.isfinite(t).all():
        raise ProfileFormatError("bad_payload", f"{name} holds NaN or infinite values")
    return t


def _mask(raw: bytes, L: int, N: int, k: int, name: str) -> torch.Tensor:
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


def read_info(data: bytes) -> ProfileInfo:
    """Validate framing, checksum and header; return the metadata without decoding tensors."""
    return _read(data)[0]


def _read(data: bytes) -> tuple[ProfileInfo, bytes]:
    version, raw_header, payload = _split_prefix(data)
    h = _parse_header(raw_header, version)
    need = sum(n for _, n in _header_sizes(h))
    if len(payload) != need:
        raise ProfileFormatError("bad_payload", f"payload has {len(payload)} bytes, the header needs {need}")
    return ProfileInfo(
        format_version=version,
        kind=h["kind"],
        bytes=len(data),
        num_layers=h["L"],
        num_adapters=h["N"],
        hidden_size=h["d"],
        bottleneck=h["r"],
        k=h["k"],
        bank_id=h["bank_id"],
        model_id=h["model_id"],
        labels=list(h["labels"]),
        max_length=h.get("max_length", 128),
        meta=dict(h.get("meta", {})),
        scale_power=float(h.get("scale_power", 1.0)),
        gains=h.get("gains", False),
        values=h.get("values", False),
    ), payload


def decode(data: bytes, bank: AdapterBank | None = None) -> Profile:
    """Parse and validate a profile file; with ``bank``, also refuse one trained for another bank."""
    info, payload = _read(data)
    L, N, d, r, C = info.num_layers, info.num_adapters, info.hidden_size, info.bottleneck, len(info.labels)
    kind = ProfileKind(info.kind)
    sections: dict[str, bytes] = {}
    offset = 0
    for name, size in _section_sizes(kind, L, N, d, r, C, info.k, info.gains, info.values):
        sections[name] = payload[offset : offset + size]
        offset += size
    profile = Profile(
        kind=kind,
        bank_id=info.bank_id,
        model_id=info.model_id,
        num_layers=L,
        num_adapters=N,
        hidden_size=d,
        bottleneck=r,
        labels=info.labels,
        k=info.k,
        max_length=info.max_length,
        meta=info.meta,
        head_weight=_floats(sections["head_weight"], (C, d), "head_weight"),
        head_bias=_floats(sections["head_bias"], (C,), "head_bias"),
    )
    if kind is ProfileKind.HARD:
        profile.mask_down = _mask(sections["mask_down"], L, N, info.k, "mask_down")
        profile.mask_up = _mask(sections["mask_up"], L, N, info.k, "mask_up")
        profile.scale_power = info.scale_power
        if info.gains:
            gains = _floats(sections["gains"], (2, L), "gains")
            if not bool(((gains > 0) & (gains <= MAX_GAIN)).all()):
                raise ProfileFormatError("bad_payload", f"gains must lie in (0, {MAX_GAIN:g}]")
            profile.gains = gains
        if info.values:
            picked = _floats(sections["values"], (2, L, info.k), "values")
            values = torch.zeros(2, L, N)
            values[torch.stack([profile.mask_down, profile.mask_up])] = picked.flatten()
            profile.values = values
    elif kind is ProfileKind.SOFT:
        for name in ("weights_down", "weights_up"):
            w = _floats(sections[name], (L, N), name)
            if bool((w < 0).any()) or not torch.allclose(w.sum(dim=1), torch.ones(L), atol=2e-2):
                raise ProfileFormatError("bad_payload", f"{name} rows are not probability vectors")
            setattr(profile, name, w)
    elif kind is ProfileKind.ADAPTER:
        shapes = {"down": (L, d, r), "down_bias": (L, r), "up": (L, r, d), "up_bias": (L, d)}
        profile.adapter = {name: _floats(sections[name], shape, name) for name, shape in shapes.items()}
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
    got = (profile.num_layers, profile.hidden_size)
    want = (bank.num_layers, bank.hidden_size)
    if kind.uses_bank:
        got += (profile.num_adapters, profile.bottleneck)
        want += (bank.num_adapters, bank.bottleneck)
    elif kind is ProfileKind.ADAPTER:
        got += (profile.bottleneck,)
        want += (bank.bottleneck,)
    if got != want:
        raise ProfileFormatError("bank_mismatch", f"profile shapes {got} do not fit the bank's {want}")


def save(profile: Profile, path) -> int:
    data = encode(profile)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def load(path, bank: AdapterBank | None = None) -> Profile:
    with open(path, "rb") as f:
        return decode(f.read(), bank)
