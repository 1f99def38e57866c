"""The ``.xpm`` profile file: the bytes a user uploads, Redis stores, and the server loads.

Layout (all integers little-endian)::

    magic  b"\\x89XPM"          4 bytes (the high bit catches 7-bit transfers, as in PNG)
    format_version             u16
    header_length              u16
    header                     JSON, UTF-8: kind, ids, shapes, k, labels, max_length, meta
    payload                    the kind's sections (:func:`sections`), in that order
    crc32                      u32 over everything before it

Payload sections per kind (bits: bitarray big-endian, padded to a byte; floats: fp16; int8:
signed bytes; indices: each in the fewest bits that hold ``N*r - 1``, big-endian, padded to a byte)::

    hard            mask_down, mask_up: L*N bits each
                    version 2 may add gains (L floats: one per layer) and values (2*L*k floats:
                    the weight of each selected adapter, row by row in index order)
    units           unit_down, then unit_up unless tied: the k units of each layer out of N*r, as
                    L*N*r bits or L*k ascending indices, whichever is smaller; gains (L floats);
                    with out_scale, out_scale (L*d int8) and out_scale_step (L floats): each
                    layer's output scaling vector is its int8 row times its step
    soft            weights_down, weights_up: L*N floats each
    single_adapter  down (L,d,r), down_bias (L,r), up (L,r,d), up_bias (L,d)
    head_only       nothing
    every kind      head_weight (C,d), head_bias (C)
    with a rule     abstain_rule: the 16 knots then the operating point (17 floats); from
                    version 5 also the held-out count (0: unknown) and the blend weight (19);
                    for the cosine score also class_means (C,d floats, unit rows); for the
                    blend score class_signs (C*d bits: 1 where a class mean is >= 0)

Version 2 adds three optional header fields for hard profiles: ``scale_power`` (a selected
adapter weighs ``1 / k**p``), ``gains`` and ``values`` (booleans: those sections are present). A
profile that uses none of them is written as version 1, byte for byte as before, so servers that
only read version 1 keep serving it. Version 3 adds the units kind, with its header fields
``tied`` and ``out_scale`` (booleans); a hard profile is still written as version 1 or 2, so a
server that reads only those keeps serving it. Version 4 adds the abstention rule: header fields
``abstain`` (the score's name) and ``fallback`` (a label, optional), and the sections above; a
profile without a rule keeps the version it had. Version 5 adds the ``blend`` score and the
rule's held-out count; a rule without either is still written as version 4. All five versions
are read. Framing and header checks live in
:mod:`xpeft.profiles.format_header`; each kind's own sections, and their decode checks, in its
module of :mod:`xpeft.profiles.kinds`; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.profiles.abstain import RULE_VALUES, SIGN_SCORES, AbstainRule
from xpeft.profiles.format_codecs import Section, pack, quantize_rows, unpack
from xpeft.profiles.format_header import (
    ABSTAIN_VERSION,
    ERROR_CODES,
    FORMAT_VERSION,
    KINDS_BY_WIRE_NAME,
    READ_VERSIONS,
    WIRE_NAMES,
    ProfileFormatError,
    ProfileInfo,
    check_compatible,
    frame,
    parse_header,
    split,
)
from xpeft.profiles.kinds import HEADER_FIELDS, KINDS, Shape
from xpeft.profiles.profile import Profile, ProfileKind

__all__ = [
    "ERROR_CODES",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "ProfileFormatError",
    "ProfileInfo",
    "check_compatible",
    "decode",
    "encode",
    "info_sections",
    "load",
    "quantize_rows",
    "read_info",
    "save",
    "sections",
]


def sections(
    kind: ProfileKind,
    L: int,
    N: int,
    d: int,
    r: int,
    C: int,
    k: int,
    abstain: str | None = None,
    version: int = FORMAT_VERSION,
    **options: object,
) -> list[Section]:
    """What a profile of ``kind`` stores, in file order: the kind's own sections (its module in
    :mod:`xpeft.profiles.kinds` says them, given its optional header fields ``options``), then
    the head and the abstention rule of every kind (its layout follows the file's ``version``)."""
    return _sections(kind, Shape(L, N, d, r, C, k), abstain, options, version)


def _sections(
    kind: ProfileKind, shape: Shape, abstain: str | None, options: Mapping[str, object], version: int
) -> list[Section]:
    C, d = shape.C, shape.d
    out = KINDS[kind].sections(shape, options)
    out += [Section("head_weight", "f16", (C, d)), Section("head_bias", "f16", (C,))]
    if abstain is not None:  # the knots and the operating point; the class vectors of their scores
        out.append(Section("abstain_rule", "f16", (RULE_VALUES[min(version, 5)],)))
        if abstain == "cosine":
            out.append(Section("class_means", "f16", (C, d)))
        elif abstain in SIGN_SCORES:
            out.append(Section("class_signs", "bits", (C, d)))
    return out


def info_sections(info: ProfileInfo) -> list[Section]:
    """The sections of the file ``info`` describes, in file order."""
    i = info
    shape = Shape(i.num_layers, i.num_adapters, i.hidden_size, i.bottleneck, len(i.labels), i.k)
    return _sections(i.profile_kind, shape, i.abstain, i.options, i.format_version)


# -- writing ---------------------------------------------------------------------------------
def _stored(profile: Profile, section: Section) -> torch.Tensor:
    """The tensor a section stores, as the profile holds it."""
    name = section.name
    rule = profile.abstain
    if name == "abstain_rule" and rule is not None:
        return rule.stored()
    if name in ("class_means", "class_signs") and rule is not None and rule.class_means is not None:
        return rule.class_means > 0 if name == "class_signs" else rule.class_means
    if name in ("head_weight", "head_bias"):
        return getattr(profile, name)
    tensor = profile.spec.stored(profile.state, section, profile.shape) if profile.state is not None else None
    if tensor is None:
        raise ProfileFormatError("bad_payload", f"a {profile.kind.value} profile needs {name}")
    return tensor


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
    extras = profile.spec.header_options(profile.state)
    header.update(extras)
    version = max(profile.spec.min_version, 2 if extras else 1)
    if profile.abstain is not None:  # a profile without a rule keeps the version it always had
        profile.abstain.check(profile.labels)
        header["abstain"] = profile.abstain.score
        if profile.abstain.fallback is not None:
            header["fallback"] = profile.abstain.fallback
        version = max(version, ABSTAIN_VERSION, profile.abstain.format_version)
    payload = b"".join(pack(s, _stored(profile, s)) for s in _sections_of(header, version))
    return frame(version, header, payload)


def _sections_of(h: dict, version: int) -> list[Section]:
    """The sections a header declares (``kind`` as a :class:`ProfileKind` or its wire name)."""
    kind = h["kind"] if isinstance(h["kind"], ProfileKind) else KINDS_BY_WIRE_NAME[h["kind"]]
    shape = Shape(h["L"], h["N"], h["d"], h["r"], len(h["labels"]), h["k"])
    options = {name: h[name] for name in HEADER_FIELDS if name in h}
    return _sections(kind, shape, h.get("abstain"), options, version)


# -- reading ---------------------------------------------------------------------------------
def _read(data: bytes) -> tuple[ProfileInfo, bytes]:
    version, raw_header, payload, crc_ok = split(data)
    try:
        h = parse_header(raw_header, version)
        need = sum(s.nbytes for s in _sections_of(h, version))
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
        options={name: f.read(h.get(name, f.default)) for name, f in HEADER_FIELDS.items()},
        abstain=h.get("abstain"),
        fallback=h.get("fallback"),
    )
    return info, payload


def read_info(data: bytes) -> ProfileInfo:
    """Validate framing, checksum and header; return the metadata without decoding tensors."""
    return _read(data)[0]


def _tensors(info: ProfileInfo, payload: bytes) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for s in info_sections(info):
        raw = payload[offset : offset + s.nbytes]
        offset += s.nbytes
        out[s.name] = unpack(s, raw, None if s.name == "class_signs" else info.k)
    return out


def decode(data: bytes, bank: AdapterBank | None = None) -> Profile:
    """Parse and validate a profile file; with ``bank``, also refuse one trained for another bank."""
    info, payload = _read(data)
    t = _tensors(info, payload)
    profile = Profile(
        kind=info.profile_kind,
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
    profile.state = profile.spec.decode(t, profile.shape, info.options)
    if info.abstain is not None:
        profile.abstain = _decode_rule(info, t)
    if bank is not None:
        check_compatible(profile, bank)
    return profile


def _decode_rule(info: ProfileInfo, t: dict[str, torch.Tensor]) -> AbstainRule:
    """The stored rule; any inconsistency is ``bad_payload``."""
    assert info.abstain is not None
    try:
        return AbstainRule.from_stored(
            info.abstain,
            t["abstain_rule"],
            info.fallback,
            t.get("class_means", t.get("class_signs")),
            info.labels,
        )
    except XPeftError as exc:
        raise ProfileFormatError("bad_payload", exc.message) from None


def save(profile: Profile, path: str | Path) -> int:
    data = encode(profile)
    Path(path).write_bytes(data)
    return len(data)


def load(path: str | Path, bank: AdapterBank | None = None) -> Profile:
    return decode(Path(path).read_bytes(), bank)
