"""Malformed ``.xpm`` uploads, made from valid ones: random bytes, truncations, bit flips (with and
without a recomputed checksum, so that the damage reaches the header and payload checks),
header edits (huge, negative, mistyped and missing fields), huge declared sizes, another bank,
wrong magic and versions, trailing bytes, oversize bodies.

Seeded: the same ``seed`` and inputs give the same corpus. A mutant may happen to stay valid (a
flipped bit inside a float of the head, say); the caller treats 2xx as "stored" and checks that.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from xpeft.profiles.kinds import WIRE_NAMES

_PREFIX = struct.Struct("<4sHH")


@dataclass(frozen=True)
class Mutant:
    category: str
    name: str
    data: bytes


def split(valid: bytes) -> tuple[dict, bytes]:
    """(header dict, payload without the CRC) of a valid file."""
    _, _, header_length = _PREFIX.unpack_from(valid)
    header = json.loads(valid[_PREFIX.size : _PREFIX.size + header_length])
    return header, valid[_PREFIX.size + header_length : -4]


def assemble(
    header: dict | bytes,
    payload: bytes,
    version: int = 1,
    magic: bytes = b"\x89XPM",
    header_length: int | None = None,
) -> bytes:
    """A file with a correct CRC (unless the caller damages it afterwards)."""
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    length = len(raw) if header_length is None else header_length
    body = _PREFIX.pack(magic, version, length & 0xFFFF) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def recrc(data: bytes) -> bytes:
    body = data[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _flip(data: bytes, rng: random.Random, bits: int, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    end = len(out) if end is None else end
    for _ in range(bits):
        i = rng.randrange(start, end)
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


# Values a header field should never accept (or that stretch it): huge, negative, mistyped, missing.
_BAD_INTS = [0, -1, 2**31, 2**63, 10**30, 129, 65537, 16385, "6", 6.5, None, True, [], {}]
_EDITS: list[tuple[str, Callable[[dict], None]]] = []


def _edit(name: str):
    def register(fn: Callable[[dict], None]) -> Callable[[dict], None]:
        _EDITS.append((name, fn))
        return fn

    return register


for _key in ("L", "N", "d", "r", "k", "max_length"):
    for _value in _BAD_INTS:
        _edit(f"{_key}={_value!r}")(lambda h, k=_key, v=_value: h.__setitem__(k, v))
    _edit(f"no {_key}")(lambda h, k=_key: h.pop(k, None))
for _key in ("kind", "bank_id", "model_id", "labels", "meta"):
    for _value in (
        None,
        7,
        "",
        "x" * 300,
        [],
        {},
        ["a"],
        ["a", "a"],
        ["a", 3],
        [""],
        ["x" * 300, "y"],
        [f"l{i}" for i in range(5000)],
        {"a": 1},
        {str(i): "v" for i in range(40)},
        "soft",
        "hard",
        "units",
    ):
        _edit(f"{_key}={str(_value)[:20]}")(lambda h, k=_key, v=_value: h.__setitem__(k, v))
    _edit(f"no {_key}")(lambda h, k=_key: h.pop(k, None))


def corpus(valid: bytes, foreign: list[bytes], n: int = 1000, seed: int = 0) -> list[Mutant]:
    """At least ``n`` malformed uploads made from ``valid`` (a profile for the served bank) and
    ``foreign`` (valid profiles for other banks or encoders)."""
    rng = random.Random(seed)
    header, payload = split(valid)
    out: list[Mutant] = []

    def add(category: str, name: str, data: bytes) -> None:
        out.append(Mutant(category, name, data))

    # Every header edit, with a correct checksum: the header checks themselves are reached.
    for name, edit in _EDITS:
        h = json.loads(json.dumps(header))
        edit(h)
        add("header_edit", name, assemble(h, payload))
    # Huge declared sizes: shapes at their bounds over a payload of a few bytes; a header length past the end.
    for L, N, d, r in [
        (128, 65536, 16384, 16384),
        (128, 65536, 384, 24),
        (6, 65536, 384, 24),
        (128, 20, 16384, 16384),
    ]:
        for kind in (*WIRE_NAMES.values(), "single_adapter"):  # every kind, and a Python name files never use
            add(
                "huge_declared",
                f"{kind} L={L} N={N} d={d} r={r}",
                assemble({**header, "kind": kind, "L": L, "N": N, "d": d, "r": r}, payload),
            )
    for length in (65535, len(valid), len(valid) + 1, 0, 1):
        raw = json.dumps(header, separators=(",", ":")).encode()
        add("huge_declared", f"header_length={length}", assemble(raw, payload, header_length=length))
    # Another bank or encoder: genuine files, and ours with an edited id.
    for i, data in enumerate(foreign):
        add("wrong_bank", f"foreign-{i}", data)
    for key, value in (
        ("bank_id", "0" * 16),
        ("model_id", "bert-L6-H384-000000000000"),
        ("N", header["N"] // 2),
    ):
        add("wrong_bank", f"{key} edited", assemble({**header, key: value}, payload))
    # Framing: magic, version, non-JSON headers, trailing and missing bytes.
    for magic in (b"\x89XPN", b"XPM\x89", b"\x00\x00\x00\x00", b"PK\x03\x04"):
        add("framing", f"magic={magic!r}", assemble(header, payload, magic=magic))
    for version in (0, 2, 255, 65535):
        add("framing", f"version={version}", assemble(header, payload, version=version))
    for raw in (b"[1,2]", b'"text"', b"null", b"{", b"\xff\xfe{}", json.dumps(header).encode()[:-1], b""):
        add("framing", f"header={raw[:12]!r}", assemble(raw, payload))
    add("framing", "trailing bytes", recrc(valid[:-4] + b"\x00" * 7 + valid[-4:]))
    add("framing", "file twice", valid + valid)
    add("framing", "crc only", valid[-4:])
    add("oversize", "70 KB of zeros", b"\x00" * 70_000)
    add("oversize", "valid + 70 KB", valid + bytes(70_000))

    fixed = len(out)
    rest = max(0, n - fixed)
    shares = {"random_bytes": 0.2, "truncation": 0.2, "bit_flip": 0.25, "bit_flip_recrc": 0.35}
    header_end = _PREFIX.size + len(json.dumps(header, separators=(",", ":")).encode())
    for category, share in shares.items():
        for i in range(int(rest * share) + 1):
            if category == "random_bytes":
                size = rng.choice([0, 1, 7, 8, 12, 64, 200, rng.randrange(2048)])
                data = rng.randbytes(size)
                if i % 3 == 0:  # a correct magic and version, then noise: framing passes, the rest must not
                    data = b"\x89XPM\x01\x00" + data
                add(category, f"random {size} bytes", data)
            elif category == "truncation":
                cut = rng.randrange(len(valid))
                add(category, f"first {cut} bytes", valid[:cut])
            elif category == "bit_flip":
                bits = rng.choice([1, 1, 2, 3, 8])
                add(category, f"{bits} bits", _flip(valid, rng, bits))
            else:  # flipped, then a correct CRC: half in the header, half in the payload
                bits = rng.choice([1, 1, 2, 4])
                where = (0, header_end) if i % 2 else (header_end, len(valid) - 4)
                add(
                    category,
                    f"{bits} bits in {'header' if i % 2 else 'payload'}",
                    recrc(_flip(valid, rng, bits, *where)),
                )
    return out
