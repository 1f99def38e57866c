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
    with a rule     abstain_rule: the 16 knots then the operating point (17 floats); for the
                    cosine score also class_means (C,d floats, unit rows)

Version 2 adds three optional header fields for hard profiles: ``scale_power`` (a selected
adapter weighs ``1 / k**p``), ``gains`` and ``values`` (booleans: those sections are present). A
profile that uses none of them is written as version 1, byte for byte as before, so servers that
only read version 1 keep serving it. Version 3 adds the units kind, with its header fields
``tied`` and ``out_scale`` (booleans); a hard profile is still written as version 1 or 2, so a
server that reads only those keeps serving it. Version 4 adds the abstention rule: header fields
``abstain`` (the score's name) and ``fallback`` (a label, optional), and the sections above; a
profile without a rule keeps the version it had. All four versions are read. Framing and header checks live in
:mod:`xpeft.profiles.format_header`; this module owns the sections, the one table of what each
kind stores.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.profiles.abstain import CLASS_MEAN_SCORES, KNOT_QUANTILES, AbstainRule
from xpeft.profiles.constants import MAX_GAIN
from xpeft.profiles.format_codecs import Section, pack, unit_selection, unpack
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
    "load",
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
    gains: bool = False,
    values: bool = False,
    tied: bool = False,
    out_scale: bool = False,
    abstain: str | None = None,
) -> list[Section]:
    """What a profile of ``kind`` stores, in file order: the one place that says it."""
    out: list[Section] = []
    if kind is ProfileKind.HARD:
        out = [Section("mask_down", "bits", (L, N)), Section("mask_up", "bits", (L, N))]
        if gains:
            out.append(Section("gains", "f16", (L,)))
        if values:
            out.append(Section("values", "f16", (2, L, k)))
    elif kind is ProfileKind.UNITS:
        out = [unit_selection("unit_down", L, N * r, k)]
        if not tied:
            out.append(unit_selection("unit_up", L, N * r, k))
        out.append(Section("gains", "f16", (L,)))
        if out_scale:
            out += [Section("out_scale", "i8", (L, d)), Section("out_scale_step", "f16", (L,))]
    elif kind is ProfileKind.SOFT:
        out = [Section("weights_down", "f16", (L, N)), Section("weights_up", "f16", (L, N))]
    elif kind is ProfileKind.SINGLE_ADAPTER:
        shapes = {"down": (L, d, r), "down_bias": (L, r), "up": (L, r, d), "up_bias": (L, d)}
        out = [Section(name, "f16", shapes[name]) for name in TENSOR_NAMES]
    out += [Section("head_weight", "f16", (C, d)), Section("head_bias", "f16", (C,))]
    if abstain is not None:  # the knots and the operating point; the class means for their scores
        out.append(Section("abstain_rule", "f16", (len(KNOT_QUANTILES) + 1,)))
        if abstain in CLASS_MEAN_SCORES:
            out.append(Section("class_means", "f16", (C, d)))
    return out


# -- writing ---------------------------------------------------------------------------------
def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row as int8 times one fp16 step: ``(q (rows, n) int8, step (rows,))``, with
    ``q * step`` the values a file holds. Applying it to its own result changes nothing."""
    v = values.detach().to("cpu", torch.float32)
    peak = v.abs().amax(dim=-1)
    step = torch.where(peak > 0, peak / 127, torch.ones_like(peak)).to(torch.float16).float()
    q = torch.round(v / step.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, step


def _unit_rows(profile: Profile, row: int, section: Section) -> torch.Tensor:
    """One projection's units as the section stores them: a k-hot mask or the indices."""
    assert profile.unit_index is not None
    index = profile.unit_index[row]
    if section.codec == "index":
        return index
    return torch.zeros(section.shape, dtype=torch.bool).scatter_(1, index, True)


def _stored(profile: Profile, section: Section) -> torch.Tensor:
    """The tensor a section stores, as the profile holds it."""
    name = section.name
    if name == "values":  # only the selected positions: (2, L, k) in index order
        assert profile.values is not None
        return profile.values[torch.stack(profile.masks())].view(2, profile.num_layers, profile.k)
    if name in ("unit_down", "unit_up"):
        return _unit_rows(profile, 0 if name == "unit_down" else 1, section)
    if name in ("out_scale", "out_scale_step") and profile.out_scale is not None:
        return quantize_rows(profile.out_scale)[0 if name == "out_scale" else 1]
    if name == "abstain_rule" and profile.abstain is not None:
        rule = profile.abstain
        return torch.cat([rule.knots.float(), torch.tensor([rule.min_confidence])])
    if name == "class_means" and profile.abstain is not None and profile.abstain.class_means is not None:
        return profile.abstain.class_means
    if name in TENSOR_NAMES:
        return profile.adapter_tensors()[name]
    tensor = getattr(profile, name)
    if tensor is None:
        raise ProfileFormatError("bad_payload", f"a {profile.kind.value} profile needs {name}")
    return tensor


def _kind_fields(profile: Profile) -> dict:
    """The optional header fields a profile needs (none for a hard one: it is written as version 1)."""
    fields: dict = {}
    if profile.kind is ProfileKind.HARD:
        if profile.scale_power != 1.0:
            fields["scale_power"] = float(profile.scale_power)
        if profile.gains is not None:
            fields["gains"] = True
        if profile.values is not None:
            fields["values"] = True
    elif profile.kind is ProfileKind.UNITS:
        fields["tied"] = bool(profile.tied)
        fields["out_scale"] = profile.out_scale is not None
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
    extras = _kind_fields(profile)
    header.update(extras)
    version = max(profile.kind.spec.min_version, 2 if extras else 1)
    if profile.abstain is not None:  # a profile without a rule keeps the version it always had
        profile.abstain.check(profile.labels)
        header["abstain"] = profile.abstain.score
        if profile.abstain.fallback is not None:
            header["fallback"] = profile.abstain.fallback
        version = ABSTAIN_VERSION
    payload = b"".join(pack(s, _stored(profile, s)) for s in _sections_of(header))
    return frame(version, header, payload)


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
        h.get("tied", False),
        h.get("out_scale", False),
        h.get("abstain"),
    )


# -- reading ---------------------------------------------------------------------------------
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
        tied=h.get("tied", False),
        out_scale=h.get("out_scale", False),
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
        i.tied,
        i.out_scale,
        i.abstain,
    ):
        raw = payload[offset : offset + s.nbytes]
        offset += s.nbytes
        out[s.name] = unpack(s, raw, info.k)
    return out


def _gains(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if not bool(((t["gains"] > 0) & (t["gains"] <= MAX_GAIN)).all()):
        raise ProfileFormatError("bad_payload", f"gains must lie in (0, {MAX_GAIN:g}]")
    return t["gains"]


def _unit_index(t: dict[str, torch.Tensor], name: str, k: int) -> torch.Tensor:
    """``(L, k)`` ascending unit ids, from a k-hot mask or stored as such."""
    rows = t[name]
    if rows.dtype is torch.bool:
        return torch.nonzero(rows)[:, 1].view(rows.shape[0], k)
    return rows


def _decode_units(profile: Profile, info: ProfileInfo, t: dict[str, torch.Tensor]) -> None:
    down = _unit_index(t, "unit_down", info.k)
    up = down if info.tied else _unit_index(t, "unit_up", info.k)
    profile.unit_index, profile.tied = torch.stack([down, up]), info.tied
    profile.gains = _gains(t)
    if info.out_scale:
        step = t["out_scale_step"]
        if not bool(((step > 0) & (step <= MAX_GAIN)).all()):
            raise ProfileFormatError("bad_payload", f"out_scale_step must lie in (0, {MAX_GAIN:g}]")
        profile.out_scale = t["out_scale"].float() * step.unsqueeze(-1)


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
            profile.gains = _gains(t)
        if "values" in t:
            values = torch.zeros(2, info.num_layers, info.num_adapters)
            values[torch.stack(profile.masks())] = t["values"].flatten()
            profile.values = values
    elif kind is ProfileKind.UNITS:
        _decode_units(profile, info, t)
    elif kind is ProfileKind.SOFT:
        ones = torch.ones(info.num_layers)
        for name in ("weights_down", "weights_up"):
            w = t[name]
            if bool((w < 0).any()) or not torch.allclose(w.sum(dim=1), ones, atol=2e-2):
                raise ProfileFormatError("bad_payload", f"{name} rows are not probability vectors")
        profile.weights_down, profile.weights_up = t["weights_down"], t["weights_up"]
    elif kind is ProfileKind.SINGLE_ADAPTER:
        profile.adapter = {name: t[name] for name in TENSOR_NAMES}
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
            info.abstain, t["abstain_rule"], info.fallback, t.get("class_means"), info.labels
        )
    except XPeftError as exc:
        raise ProfileFormatError("bad_payload", exc.message) from None


def save(profile: Profile, path: str | Path) -> int:
    data = encode(profile)
    Path(path).write_bytes(data)
    return len(data)


def load(path: str | Path, bank: AdapterBank | None = None) -> Profile:
    return decode(Path(path).read_bytes(), bank)
