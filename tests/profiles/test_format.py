""".xpm round-trips for every kind; every corrupt or foreign file is refused with its code."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
import torch

from xpeft.adapters.bank import create_random_bank
from xpeft.profiles import format as xpm
from xpeft.profiles.format import ProfileFormatError
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.synthetic import random_profile


def _same(a, b, atol=1e-3):
    if a is None or b is None:
        assert a is None and b is None
        return
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-3)


@pytest.mark.parametrize("kind", list(ProfileKind))
def test_round_trip_every_kind(bank, kind):
    profile = random_profile(bank, kind, seed=3, labels=["neg", "neu", "pos"])
    data = xpm.encode(profile)
    back = xpm.decode(data, bank)
    assert back.kind is kind
    assert (back.labels, back.k, back.bank_id, back.model_id) == (
        profile.labels,
        profile.k,
        bank.bank_id,
        bank.model_id,
    )
    _same(back.head_weight, profile.head_weight)
    _same(back.head_bias, profile.head_bias, atol=1e-3)
    if kind is ProfileKind.HARD:
        assert torch.equal(back.mask_down, profile.mask_down)
        assert torch.equal(back.mask_up, profile.mask_up)
    if kind is ProfileKind.UNITS:
        assert torch.equal(back.unit_index, profile.unit_index)
        _same(back.gains, profile.gains)
    _same(back.weights_down, profile.weights_down)
    _same(back.weights_up, profile.weights_up)
    if kind is ProfileKind.SINGLE_ADAPTER:
        for name, tensor in profile.adapter.items():
            _same(back.adapter[name], tensor, atol=2e-3)
    assert xpm.encode(back) == data  # fp16 is a fixed point: the second trip changes nothing
    info = xpm.read_info(data)
    assert (info.kind, info.bytes, info.num_layers, info.num_adapters) == (
        kind.value,
        len(data),
        bank.num_layers,
        bank.num_adapters,
    )


def test_hard_profile_sizes():
    # The MiniLM default (L=6, d=384) and a BERT-base shape (L=12, d=768), N=100, 2 labels.
    for L, d, limit in [(6, 384, 2048), (12, 768, 4096)]:
        bank = create_random_bank(L, d, model_id=f"bert-L{L}-H{d}-000000000000", num_adapters=100)
        # the default hard profile: masks plus one gain per layer (format version 2)
        profile = random_profile(bank, ProfileKind.HARD, labels=["negative", "positive"], k=10, gains=True)
        profile.meta["model_name"] = "minilm"
        size = len(xpm.encode(profile))
        assert size <= limit, (L, d, size)
        # the masks are 2*L*N bits: most of the file is the fp16 head
        assert size - 2 * (2 * d + 2) < 2 * L * 100 // 8 + 400


def _refused(data, code, bank=None):
    with pytest.raises(ProfileFormatError) as err:
        xpm.decode(data, bank)
    assert err.value.code == code, err.value
    assert err.value.message
    return err.value


@pytest.fixture(scope="module")
def good(bank):
    return xpm.encode(random_profile(bank, ProfileKind.HARD, seed=5))


def _reseal(body: bytes) -> bytes:
    """Recompute the checksum so the error is reported by the check behind it."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_truncated_files_are_refused(good):
    for n in [0, 3, 8, 20, len(good) // 2, len(good) - 1]:
        _refused(good[:n], "truncated")


def test_foreign_file_is_refused(good):
    _refused(b"PK\x03\x04" + good[4:], "bad_magic")
    _refused(b'{"hello": "world"}' * 10, "bad_magic")


def test_newer_version_is_refused(good):
    _refused(good[:4] + struct.pack("<H", 99) + good[6:], "unsupported_version")


def test_every_single_bit_flip_is_detected(good):
    rng = random.Random(0)
    for _ in range(300):
        pos = rng.randrange(len(good))
        flipped = bytearray(good)
        flipped[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(ProfileFormatError):
            xpm.decode(bytes(flipped))


def test_bit_flip_in_payload_is_a_checksum_mismatch(good):
    flipped = bytearray(good)
    flipped[len(good) - 10] ^= 0x10
    _refused(bytes(flipped), "checksum_mismatch")


def test_header_that_is_not_json_is_refused(good):
    (hlen,) = struct.unpack_from("<H", good, 6)
    body = good[:8] + b"\xff" * hlen + good[8 + hlen : -4]
    _refused(_reseal(body), "bad_header")


def test_huge_declared_sizes_are_refused_without_allocating(bank, good):
    import json

    (hlen,) = struct.unpack_from("<H", good, 6)
    header = json.loads(good[8 : 8 + hlen])
    for key, value in [
        ("L", 10**9),
        ("N", 2**40),
        ("d", -1),
        ("k", 0),
        ("labels", 7),
        ("labels", {"a": 1}),
        ("max_length", True),
        ("k", True),
        ("kind", ["hard"]),
    ]:
        h = dict(header, **{key: value})
        raw = json.dumps(h).encode()
        body = good[:6] + struct.pack("<H", len(raw)) + raw + good[8 + hlen : -4]
        _refused(_reseal(body), "bad_header")
    # plausible shapes that the payload does not hold
    h = dict(header, N=4000)
    raw = json.dumps(h).encode()
    body = good[:6] + struct.pack("<H", len(raw)) + raw + good[8 + hlen : -4]
    _refused(_reseal(body), "bad_payload")


def test_mask_rows_must_be_k_hot(bank):
    profile = random_profile(bank, ProfileKind.HARD, seed=1)
    profile.mask_down[0, :] = False
    profile.mask_down[0, :3] = True  # 3 bits set, k is 2
    _refused(xpm.encode(profile), "bad_payload")


def test_non_finite_head_is_refused(bank):
    profile = random_profile(bank, ProfileKind.HARD, seed=1)
    profile.head_weight[0, 0] = float("nan")
    _refused(xpm.encode(profile), "bad_payload")


def test_profile_for_another_bank_is_refused(encoder, bank):
    other = create_random_bank(bank.num_layers, bank.hidden_size, bank.model_id, num_adapters=20, seed=1)
    data = xpm.encode(random_profile(other, ProfileKind.HARD))
    xpm.decode(data)  # a valid file on its own
    err = _refused(data, "bank_mismatch", bank)
    assert other.bank_id in err.message and bank.bank_id in err.message


def test_profile_for_another_encoder_is_refused(bank):
    foreign = create_random_bank(
        bank.num_layers, bank.hidden_size, "bert-L6-H384-ffffffffffff", num_adapters=20
    )
    for kind in ProfileKind:
        _refused(xpm.encode(random_profile(foreign, kind)), "bank_mismatch", bank)


# -- version 2: hard profiles with a scale exponent, gains and per-adapter weights --------------
def test_plain_profiles_are_still_written_as_version_1(bank):
    for kind in (k for k in ProfileKind if k.spec.min_version == 1):
        data = xpm.encode(random_profile(bank, kind, seed=2))
        assert struct.unpack_from("<H", data, 4)[0] == 1
        assert xpm.read_info(data).format_version == 1


@pytest.mark.parametrize(
    "extras",
    [
        {"scale_power": 0.75},
        {"gains": True},
        {"weighted": True},
        {"scale_power": 0.5, "gains": True, "weighted": True},
    ],
)
def test_version_2_round_trip_keeps_the_mixing_weights(bank, extras):
    profile = random_profile(bank, ProfileKind.HARD, seed=4, **extras)
    data = xpm.encode(profile)
    assert struct.unpack_from("<H", data, 4)[0] == 2
    back = xpm.decode(data, bank)
    for got, want in zip(back.mixing_weights(), profile.mixing_weights(), strict=True):
        _same(got, want, atol=2e-3)
    assert back.scale_power == profile.scale_power
    assert xpm.encode(back) == data
    info = xpm.read_info(data)
    assert (info.format_version, info.gains, info.values) == (2, "gains" in extras, "weighted" in extras)


def test_version_2_costs_only_its_extra_sections(bank):
    plain = len(xpm.encode(random_profile(bank, ProfileKind.HARD, seed=4)))
    L, k = bank.num_layers, max(1, bank.num_adapters // 10)
    gains = len(xpm.encode(random_profile(bank, ProfileKind.HARD, seed=4, gains=True)))
    weighted = len(xpm.encode(random_profile(bank, ProfileKind.HARD, seed=4, weighted=True)))
    assert gains - plain - 2 * L in range(0, 20)  # the section plus a short header field
    assert weighted - plain - 2 * 2 * L * k in range(0, 20)


def _with_header(data: bytes, version: int, **changes) -> bytes:
    import json

    (hlen,) = struct.unpack_from("<H", data, 6)
    header = json.loads(data[8 : 8 + hlen])
    header.update(changes)
    raw = json.dumps(header).encode()
    return _reseal(struct.pack("<4sHH", data[:4], version, len(raw)) + raw + data[8 + hlen : -4])


def test_version_2_fields_are_refused_where_they_do_not_belong(bank):
    hard = xpm.encode(random_profile(bank, ProfileKind.HARD, seed=6, scale_power=0.5))
    _refused(_with_header(hard, 1), "bad_header")  # a version-1 file cannot carry them
    for bad in [{"scale_power": "x"}, {"scale_power": 9.0}, {"scale_power": True}, {"gains": 1}]:
        _refused(_with_header(hard, 2, **bad), "bad_header")
    _refused(_with_header(hard, 2, gains=True), "bad_payload")  # declared, but no section
    soft = xpm.encode(random_profile(bank, ProfileKind.SOFT, seed=6))
    _refused(_with_header(soft, 2, scale_power=0.5), "bad_header")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 5000.0])
def test_gains_must_be_positive_finite_and_bounded(bank, bad):
    profile = random_profile(bank, ProfileKind.HARD, seed=7, gains=True)
    profile.gains[1] = bad
    _refused(xpm.encode(profile), "bad_payload")
