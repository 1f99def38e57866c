"""The ``.xpm`` framing and header: magic, version, JSON header, checksum, their validation, and
whether a header fits a bank.

Everything here is checked before a single tensor is allocated: the payload sizes follow from the
header alone (:mod:`xpeft.profiles.format` turns them into tensors), so a file that declares huge
shapes is refused cheaply.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xpeft.profiles.constants import ABSTAIN_SCORES, SIGN_SCORES
from xpeft.profiles.format_errors import ERROR_CODES, ProfileFormatError
from xpeft.profiles.kinds import HEADER_FIELDS, KINDS, KINDS_BY_WIRE_NAME, WIRE_NAMES, ProfileKind
from xpeft.profiles.text import TextError, check_text

if TYPE_CHECKING:  # only the annotations of check_compatible: the header needs no torch
    from xpeft.adapters.bank import AdapterBank
    from xpeft.profiles.profile import Profile

MAGIC = b"\x89XPM"
FORMAT_VERSION = 5  # the newest version this build writes
READ_VERSIONS = (1, 2, 3, 4, 5)
ABSTAIN_VERSION = 4  # the first version that holds an abstention rule
SIGN_VERSION = 5  # the first that holds the blend score (and the rule's held-out count)
PREFIX = struct.Struct("<4sHH")
CRC = struct.Struct("<I")
# Bounds on declared shapes: far above any real encoder, far below anything that hurts.
LIMITS = {"L": 128, "N": 65536, "d": 16384, "r": 16384, "C": 4096}
MAX_META_ITEMS = 32
# re-exported: the kinds table's wire names, the error and its codes (format_errors.py)
__all__ = ["ERROR_CODES", "KINDS_BY_WIRE_NAME", "WIRE_NAMES", "ProfileFormatError"]


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
    meta: dict[str, str] = field(default_factory=dict)
    # every kind's optional header fields (the kinds declare them: HEADER_FIELDS), each at its
    # default where this kind or this file has none; they read as attributes too (``info.tied``)
    options: dict[str, bool | float] = field(default_factory=dict)
    abstain: str | None = None  # the abstention rule's score; None: the profile never abstains
    fallback: str | None = None  # the label an abstaining row answers (None: no label)

    def __getattr__(self, name: str) -> bool | float:
        if name in HEADER_FIELDS:
            options = self.__dict__.get("options", {})
            return options.get(name, HEADER_FIELDS[name].default)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def profile_kind(self) -> ProfileKind:
        return ProfileKind(self.kind)

    def as_dict(self) -> dict:
        """The fields, the optional header fields among them by name, as ``xpeft info`` and the
        server's metadata show them."""
        out = dict(self.__dict__)
        options = out.pop("options")
        abstain = {key: out.pop(key) for key in ("abstain", "fallback")}
        return {**out, **{name: options.get(name, f.default) for name, f in HEADER_FIELDS.items()}, **abstain}


def frame(version: int, header: dict, payload: bytes) -> bytes:
    """Prefix, header and payload, sealed with the checksum."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(raw) > 0xFFFF:
        raise ProfileFormatError("bad_header", f"header of {len(raw)} bytes exceeds 65535")
    body = PREFIX.pack(MAGIC, version, len(raw)) + raw + payload
    return body + CRC.pack(zlib.crc32(body))


def _check_int(header: dict, key: str, low: int, high: int) -> None:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProfileFormatError("bad_header", f"{key}={value!r} is not an integer in [{low}, {high}]")


def _check_kind_fields(header: dict, version: int, kind: ProfileKind) -> None:
    """A kind's optional fields (its module declares them): only in version 2 and later, only
    for that kind, and of the right types."""
    spec = KINDS[kind]
    if version < spec.min_version:
        raise ProfileFormatError(
            "bad_header", f"a {spec.wire} profile needs format version {spec.min_version}"
        )
    present = [key for key in sorted(HEADER_FIELDS) if key in header]
    if not present:
        return
    own = tuple(f.name for f in spec.header_fields)
    if version < 2 or not set(present) <= set(own):
        raise ProfileFormatError(
            "bad_header", f"{present} need format version 2 and a kind that has them {own}"
        )
    for f in spec.header_fields:
        if f.name in header:
            f.check(header[f.name])


def _check_abstain(header: dict, version: int) -> None:
    """The rule's fields: ``abstain`` (its score) from version 4 on, ``fallback`` only with it and
    only one of the profile's labels."""
    if "abstain" not in header:
        if "fallback" in header:
            raise ProfileFormatError("bad_header", "fallback needs an abstention rule")
        return
    if version < ABSTAIN_VERSION:
        raise ProfileFormatError("bad_header", f"an abstention rule needs format version {ABSTAIN_VERSION}")
    if header["abstain"] not in ABSTAIN_SCORES:
        raise ProfileFormatError(
            "bad_header", f"abstain={header['abstain']!r} is not one of {ABSTAIN_SCORES}"
        )
    if header["abstain"] in SIGN_SCORES and version < SIGN_VERSION:
        raise ProfileFormatError(
            "bad_header", f"the {header['abstain']} score needs format version {SIGN_VERSION}"
        )
    fallback = header.get("fallback")
    if fallback is not None and fallback not in header["labels"]:
        raise ProfileFormatError(
            "bad_header", f"fallback label {fallback!r} is not one of the profile's labels"
        )


def parse_header(raw: bytes, version: int) -> dict:
    """The header as JSON, every field checked; ``kind`` becomes a :class:`ProfileKind`."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileFormatError("bad_header", f"header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProfileFormatError("bad_header", "header is not a JSON object")
    wire = header.get("kind")
    if not isinstance(wire, str) or wire not in KINDS_BY_WIRE_NAME:
        raise ProfileFormatError("bad_header", f"unknown kind {wire!r}; one of {sorted(KINDS_BY_WIRE_NAME)}")
    kind = KINDS_BY_WIRE_NAME[wire]
    labels = header.get("labels")
    if not isinstance(labels, list):
        raise ProfileFormatError("bad_header", "labels must be a JSON list of strings")
    for key, bound in LIMITS.items():
        if key != "C":
            _check_int(header, key, 1, bound)
    if "abstain" in header and len(labels) < 2:
        raise ProfileFormatError("bad_header", "an abstention rule needs a profile of at least 2 labels")
    if not 2 <= len(labels) <= LIMITS["C"] or not all(
        isinstance(x, str) and 0 < len(x) <= 256 for x in labels
    ):
        raise ProfileFormatError(
            "bad_header", f"labels must be 2 to {LIMITS['C']} non-empty strings of <= 256 chars"
        )
    if len(set(labels)) != len(labels):
        raise ProfileFormatError("bad_header", "labels must be distinct")
    for key in ("bank_id", "model_id"):
        if not isinstance(header.get(key), str) or not 0 < len(header[key]) <= 128:
            raise ProfileFormatError("bad_header", f"{key} must be a non-empty string")
    _check_int(header, "k", *KINDS[kind].k_bounds(header["N"], header["r"]))
    header.setdefault("max_length", 128)
    _check_int(header, "max_length", 1, 65536)
    meta = header.setdefault("meta", {})
    if (
        not isinstance(meta, dict)
        or len(meta) > MAX_META_ITEMS
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise ProfileFormatError("bad_header", f"meta must be at most {MAX_META_ITEMS} string pairs")
    _check_kind_fields(header, version, kind)
    _check_abstain(header, version)
    try:  # the one text rule (profiles/text.py): what is stored here is shown by every listing
        for n, label in enumerate(labels):
            check_text(label, f"labels[{n}]", 256)
        for key in ("bank_id", "model_id"):
            check_text(header[key], key, 128)
        for name, value in meta.items():
            check_text(name, "a meta key", 256)
            check_text(value, f"meta[{name[:64]!r}]", 0xFFFF, multiline=True, allow_empty=True)
    except TextError as exc:
        raise ProfileFormatError("bad_header", exc.message) from None
    header["kind"] = kind
    return header


def split(data: bytes) -> tuple[int, bytes, bytes, bool]:
    """Check framing, magic and version; return (version, raw header, payload, checksum matches).

    The checksum verdict goes back to the caller, which knows the payload's sections: a damaged
    file whose header still parses and whose payload is shorter than it needs is reported as
    ``truncated`` (a cut upload), any other damage as ``checksum_mismatch``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProfileFormatError("bad_magic", "profile data must be bytes")
    data = bytes(data)
    if len(data) < PREFIX.size + CRC.size:
        raise ProfileFormatError("truncated", f"{len(data)} bytes is shorter than any profile file")
    magic, version, header_length = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ProfileFormatError("bad_magic", "not an xpeft profile (.xpm) file: wrong magic bytes")
    if version not in READ_VERSIONS:
        raise ProfileFormatError(
            "unsupported_version", f"format version {version}; this build reads versions {READ_VERSIONS}"
        )
    if len(data) < PREFIX.size + header_length + CRC.size:
        raise ProfileFormatError("truncated", f"{len(data)} bytes cannot hold the declared header")
    body, (stored_crc,) = data[: -CRC.size], CRC.unpack(data[-CRC.size :])
    header_end = PREFIX.size + header_length
    return version, body[PREFIX.size : header_end], body[header_end:], zlib.crc32(body) == stored_crc


def check_compatible(profile: Profile | ProfileInfo, bank: AdapterBank) -> None:
    """Refuse a profile made for another bank (bank kinds) or another encoder / shape (all kinds)."""
    spec = KINDS[ProfileKind(profile.kind)]
    if profile.model_id != bank.model_id:
        raise ProfileFormatError(
            "bank_mismatch",
            f"profile was trained for encoder {profile.model_id}, this bank serves {bank.model_id}",
        )
    if spec.uses_bank and profile.bank_id != bank.bank_id:
        raise ProfileFormatError(
            "bank_mismatch",
            f"profile was trained on bank {profile.bank_id}, the bank in use is {bank.bank_id}",
        )
    names = ("num_layers", "hidden_size", *spec.bank_shapes)  # the shapes this kind shares with the bank
    got = tuple(getattr(profile, name) for name in names)
    want = tuple(getattr(bank, name) for name in names)
    if got != want:
        raise ProfileFormatError("bank_mismatch", f"profile shapes {got} do not fit the bank's {want}")
