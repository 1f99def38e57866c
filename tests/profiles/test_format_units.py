"""The units kind in ``.xpm`` files: both selection codecs, tied and separate, the int8 output
scaling vector, and every malformed field refused with its code."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch

from xpeft.profiles import format as xpm
from xpeft.profiles.format import ProfileFormatError, sections
from xpeft.profiles.format_codecs import index_width
from xpeft.profiles.kinds import ProfileKind
from xpeft.profiles.synthetic import random_profile

UNITS = ProfileKind.UNITS


def _refused(data: bytes, code: str, bank=None) -> None:
    with pytest.raises(ProfileFormatError) as err:
        xpm.decode(data, bank)
    assert err.value.code == code, err.value
    assert err.value.message


def _parts(data: bytes) -> tuple[int, dict, bytes]:
    version, hlen = struct.unpack_from("<HH", data, 4)
    return version, json.loads(data[8 : 8 + hlen]), data[8 + hlen : -4]


def _build(version: int, header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    body = struct.pack("<4sHH", b"\x89XPM", version, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _codec(bank, k: int) -> str:
    P = bank.num_adapters * bank.bottleneck
    return "bits" if k * index_width(P) >= P else "index"


@pytest.mark.parametrize("k", [32, 96])  # N=20, r=24: 32 units are stored as indices, 96 as bits
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("out_scale", [False, True])
def test_units_round_trip(bank, k, tied, out_scale):
    profile = random_profile(bank, UNITS, seed=5, k=k, tied=tied, out_scale=out_scale)
    data = xpm.encode(profile)
    assert struct.unpack_from("<H", data, 4)[0] == 3
    back = xpm.decode(data, bank)
    assert torch.equal(back.unit_index, profile.unit_index)
    assert back.tied is tied and back.k == k
    assert torch.equal(back.unit_index[0], back.unit_index[1]) is tied or not tied
    torch.testing.assert_close(back.gains, profile.gains, atol=1e-3, rtol=1e-3)
    if out_scale:
        torch.testing.assert_close(back.out_scale, profile.out_scale)  # stored exactly as quantized
    else:
        assert back.out_scale is None
    assert xpm.encode(back) == data
    info = xpm.read_info(data)
    assert (info.kind, info.tied, info.out_scale, info.format_version) == ("units", tied, out_scale, 3)


def test_selection_uses_the_smaller_codec(bank):
    L, N, r = bank.num_layers, bank.num_adapters, bank.bottleneck
    for k in (8, 32, 53, 54, 96, N * r):
        section = sections(UNITS, L, N, bank.hidden_size, r, 2, k)[0]
        assert section.codec == _codec(bank, k)
        assert section.nbytes == min((L * N * r + 7) // 8, (L * k * index_width(N * r) + 7) // 8) or (
            section.codec == "bits"
        )


def test_units_bytes_are_what_the_sections_say(bank):
    L, d = bank.num_layers, bank.hidden_size
    plain = len(xpm.encode(random_profile(bank, UNITS, seed=1, k=32)))
    tied = len(xpm.encode(random_profile(bank, UNITS, seed=1, k=32, tied=True)))
    scaled = len(xpm.encode(random_profile(bank, UNITS, seed=1, k=32, out_scale=True)))
    one = (L * 32 * index_width(bank.num_adapters * bank.bottleneck) + 7) // 8
    assert plain - tied == one + 1  # one selection less; the header says "true" for "false"
    assert scaled - plain == L * d + 2 * L - 1  # int8 rows and fp16 steps; "true" for "false"


@pytest.mark.parametrize("k", [0, 20 * 24 + 1])
def test_k_outside_the_units_is_refused(bank, k):
    version, header, payload = _parts(xpm.encode(random_profile(bank, UNITS, seed=2, k=32)))
    _refused(_build(version, {**header, "k": k}, payload), "bad_header")


def test_units_need_version_3_and_only_their_own_fields(bank):
    version, header, payload = _parts(xpm.encode(random_profile(bank, UNITS, seed=2, k=32)))
    _refused(_build(2, header, payload), "bad_header")
    _refused(_build(3, {**header, "scale_power": 0.5}, payload), "bad_header")
    _refused(_build(3, {**header, "tied": "yes"}, payload), "bad_header")
    _refused(_build(3, {**header, "tied": True}, payload), "bad_payload")  # one section too many
    hard_version, hard, hard_payload = _parts(xpm.encode(random_profile(bank, ProfileKind.HARD, seed=2)))
    _refused(_build(3, {**hard, "tied": False}, hard_payload), "bad_header")


def _with_section(bank, name: str, raw: bytes, **make) -> bytes:
    profile = random_profile(bank, UNITS, seed=3, **make)
    version, header, payload = _parts(xpm.encode(profile))
    L, N, d, r = bank.down.shape
    offset = 0
    for s in sections(UNITS, L, N, d, r, 2, header["k"], tied=header["tied"], out_scale=header["out_scale"]):
        if s.name == name:
            assert len(raw) == s.nbytes
            return _build(version, header, payload[:offset] + raw + payload[offset + s.nbytes :])
        offset += s.nbytes
    raise AssertionError(name)


def test_indices_out_of_order_or_range_are_refused(bank):
    L, P, k = bank.num_layers, bank.num_adapters * bank.bottleneck, 32
    width = index_width(P)
    section = sections(UNITS, L, bank.num_adapters, bank.hidden_size, bank.bottleneck, 2, k)[0]
    assert section.codec == "index"
    good = torch.arange(k).repeat(L, 1)
    from xpeft.profiles.format_codecs import pack

    descending = pack(section, good.flip(-1))
    repeated = pack(section, torch.zeros(L, k, dtype=torch.long))
    # the largest value the width holds is past the layer's P units
    too_big = pack(section, torch.cat([good[:, :-1], torch.full((L, 1), 2**width - 1)], dim=1))
    for raw in (descending, repeated, too_big):
        _refused(_with_section(bank, "unit_down", raw, k=k), "bad_payload", bank)


def test_selection_bits_must_be_k_hot_and_padding_clear(bank):
    k = 96
    L, P = bank.num_layers, bank.num_adapters * bank.bottleneck
    section = sections(UNITS, L, bank.num_adapters, bank.hidden_size, bank.bottleneck, 2, k)[0]
    assert section.codec == "bits"
    from xpeft.profiles.format_codecs import pack

    short = torch.zeros(L, P, dtype=torch.bool)
    short[:, : k - 1] = True
    _refused(_with_section(bank, "unit_down", pack(section, short), k=k), "bad_payload", bank)


def test_out_scale_rejects_minus_128_and_bad_steps(bank):
    L, d = bank.num_layers, bank.hidden_size
    row = bytes([0x80]) + bytes(L * d - 1)  # int8 -128
    _refused(_with_section(bank, "out_scale", row, k=32, out_scale=True), "bad_payload", bank)
    for bad in (0.0, -1.0, float("inf"), 4096.0):
        steps = struct.pack(f"<{L}e", *([bad] + [0.01] * (L - 1)))
        _refused(_with_section(bank, "out_scale_step", steps, k=32, out_scale=True), "bad_payload", bank)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 5000.0])
def test_units_gains_must_be_positive_finite_and_bounded(bank, bad):
    profile = random_profile(bank, UNITS, seed=7, k=32)
    profile.gains[1] = bad
    _refused(xpm.encode(profile), "bad_payload")


def test_units_profile_for_another_bank_is_refused(bank):
    from xpeft.adapters.bank import create_random_bank

    other = create_random_bank(
        bank.num_layers, bank.hidden_size, bank.model_id, num_adapters=bank.num_adapters, seed=9
    )
    _refused(xpm.encode(random_profile(other, UNITS, seed=1, k=32)), "bank_mismatch", bank)
