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

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.constants import ABSTAIN_SCORES
from xpeft.profiles.kinds import KINDS, KINDS_BY_WIRE_NAME, WIRE_NAMES, ProfileKind
from xpeft.profiles.text import TextError, check_text

if TYPE_CHECKING:  # only the annotations of check_compatible: the header needs no torch
    from xpeft.adapters.bank import AdapterBank
    from xpeft.profiles.profile import Profile

MAGIC = b"\x89XPM"
FORMAT_VERSION = 4  # the newest version this build writes
READ_VERSIONS = (1, 2, 3, 4)
ABSTAIN_VERSION = 4  # the first version that holds an abstention rule
PREFIX = struct.Struct("<4sHH")
CRC = struct.Struct("<I")
# Bounds on declared shapes: far above any real encoder, far below anything that hurts.
LIMITS = {"L": 128, "N": 65536, "d": 16384, "r": 16384, "C": 4096}
MAX_META_ITEMS = 32
MAX_UNITS = 65536  # units kind: the most units a layer may select
__all__ = ["KINDS_BY_WIRE_NAME", "WIRE_NAMES"]  # re-exported from the kinds table


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
    meta: dict[str, str] = field(default_factory=dict)
    scale_power: float = 1.0
    gains: bool = False
    values: bool = False
    tied: bool = False
    out_scale: bool = False
    abstain: str | None = None  # the abstention rule's score; None: the profile never abstains
    fallback: str | None = None  # the label an abstaining row answers (None: no label)

    @property
    def profile_kind(self) -> ProfileKind:
        return ProfileKind(self.kind)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


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
    """A kind's optional fields (the kinds table names them): only in version 2 and later, only
    for that kind, and of the right types."""
    spec = KINDS[kind]
    if version < spec.min_version:
        raise ProfileFormatError(
            "bad_header", f"a {spec.wire} profile needs format version {spec.min_version}"
        )
    optional = {name for s in KINDS.values() for name in s.header_fields}
    present = [key for key in sorted(optional) if key in header]
    if not present:
        return
    if version < 2 or not set(present) <= set(spec.header_fields):
        raise ProfileFormatError(
            "bad_header", f"{present} need format version 2 and a kind that has them {spec.header_fields}"
        )
    power = header.get("scale_power", 1.0)
    if not isinstance(power, int | float) or isinstance(power, bool) or not 0.0 <= power <= 4.0:
        raise ProfileFormatError("bad_header", f"scale_power={power!r} is not a number in [0, 4]")
    for key in ("gains", "values", "tied", "out_scale"):
        if not isinstance(header.get(key, False), bool):
            raise ProfileFormatError("bad_header", f"{key} must be a JSON boolean")


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
    if kind is ProfileKind.HARD:
        _check_int(header, "k", 1, header["N"])
    elif kind is ProfileKind.UNITS:
        _check_int(header, "k", 1, min(header["N"] * header["r"], MAX_UNITS))
    else:
        _check_int(header, "k", 0, header["N"])
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
