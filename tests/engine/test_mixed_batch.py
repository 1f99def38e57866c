"""One forward pass serves rows of many profiles, each row as if it ran alone."""

from __future__ import annotations

import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.runtime import MultiProfileModel, SlotBatch
from xpeft.engine.slots import SlotPool
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.synthetic import random_profile

TEXTS = [
    "a gripping, beautifully acted film",
    "the plot is dull",
    "It was fine, I suppose.",
    "I would not recommend this to anyone at all, really, not even my worst enemy",
    "great",
    "Terrible service and cold food.",
]


def row_logits(model: MultiProfileModel, inputs, rows, profiles, batch: SlotBatch | None = None):
    """Each row's logits over its own profile's labels, on the host; ``batch`` defaults to a
    transient pool of ``profiles``."""
    batch = batch or model.transient_batch(profiles)
    logits = model.forward_rows(inputs, rows, profiles, batch)[0].cpu()
    return [logits[i, : profiles[r].num_labels] for i, r in enumerate(rows)]


def test_mixed_batch_matches_each_row_alone(encoder, bank):
    model = MultiProfileModel(encoder, bank)
    kinds = [
        ProfileKind.HARD,
        ProfileKind.SOFT,
        ProfileKind.SINGLE_ADAPTER,
        ProfileKind.HEAD_ONLY,
        ProfileKind.HARD,
        ProfileKind.UNITS,
    ]
    profiles = [
        xpm.decode(xpm.encode(random_profile(bank, kind, seed=i, labels=["a", "b", "c"][: 2 + i % 2])), bank)
        for i, kind in enumerate(kinds)
    ]
    # a version-2 hard profile (scale exponent, gains, per-adapter weights) in the same batch
    extras = random_profile(bank, ProfileKind.HARD, seed=9, scale_power=0.75, gains=True, weighted=True)
    profiles.append(xpm.decode(xpm.encode(extras), bank))
    # units profiles of two sizes, tied and with an output scaling vector: two gathers in one fill
    for seed, make in ((10, {"k": 32, "tied": True}), (11, {"k": 32, "out_scale": True}), (12, {"k": 7})):
        units = random_profile(bank, ProfileKind.UNITS, seed=seed, **make)
        profiles.append(xpm.decode(xpm.encode(units), bank))
    # every profile gets rows, interleaved, so the batch mixes them row by row
    requests = [
        (profiles[i % len(profiles)], [TEXTS[i % len(TEXTS)], TEXTS[(i + 3) % len(TEXTS)]]) for i in range(20)
    ]
    inputs = [t for _, texts in requests for t in texts]
    distinct = list({id(p): p for p, _ in requests}.values())
    rows = [distinct.index(p) for p, texts in requests for _ in texts]
    # the mixed batch reads a long-lived pool (slots scattered, as the server's are); each row
    # alone runs on a transient pool of its one profile
    pool = SlotPool(2 * len(distinct), bank.num_layers, bank.hidden_size, bank.bottleneck)
    slots = [2 * len(distinct) - 1 - 2 * u for u in range(len(distinct))]
    model.fuse_into_pool(pool, slots, distinct)
    mixed = row_logits(model, inputs, rows, distinct, SlotBatch(pool, slots))
    for text, row, logits in zip(inputs, rows, mixed, strict=True):
        alone = row_logits(model, [text], [0], [distinct[row]])[0]
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    # and the profiles really differ from one another, so the test could fail
    first = row_logits(model, [TEXTS[0]], [0], [profiles[0]])[0]
    other = row_logits(model, [TEXTS[0]], [0], [profiles[4]])[0]
    assert (first - other).abs().max() > 1e-3


def test_fuse_runs_once_per_distinct_profile(encoder, bank, monkeypatch):
    model = MultiProfileModel(encoder, bank)
    p, q = random_profile(bank, seed=1), random_profile(bank, seed=2)
    calls = []
    import xpeft.engine.runtime as runtime

    def counting(real):
        def call(down, up, b, *weights):
            calls.append(down.shape[0])
            return real(down, up, b, *weights)

        return call

    # hard profiles fuse by a gather on a CPU, by the GEMM on a GPU: either counts
    monkeypatch.setattr(runtime, "fuse", counting(runtime.fuse))
    monkeypatch.setattr(runtime, "fuse_gather", counting(runtime.fuse_gather))
    answers = model.predict_batch([(p, ["x", "y", "z"]), (q, ["u"]), (p, ["v", "w"])])
    assert calls == [2]  # one batched fusion, U = 2 distinct profiles, not one per row
    assert [len(a) for a in answers] == [3, 1, 2]


def test_head_only_adapter_adds_nothing(encoder, bank):
    enc = encoder.tokenize(TEXTS)
    with torch.no_grad():
        plain = encoder(enc)
        zero = encoder(enc, FusedAdapters.zeros(bank.num_layers, bank.hidden_size, bank.bottleneck))
    torch.testing.assert_close(plain, zero, atol=0, rtol=0)


def test_units_gather_equals_the_dense_training_fusion(encoder, bank):
    """What the server fuses (a gather of the stored units) is what training ran (dense STE weights)."""
    from xpeft.adapters.fusion import fuse_unit_weights

    model = MultiProfileModel(encoder, bank)
    for make in ({"k": 32}, {"k": 96, "tied": True, "out_scale": True}):
        p = xpm.decode(xpm.encode(random_profile(bank, ProfileKind.UNITS, seed=4, **make)), bank)
        L, P = bank.num_layers, bank.num_adapters * bank.bottleneck
        dense = [
            torch.zeros(1, L, P).scatter_(2, p.unit_index[i].unsqueeze(0), p.unit_weight()) for i in (0, 1)
        ]
        out = None if p.out_scale is None else p.out_scale.unsqueeze(0)
        want = fuse_unit_weights(dense[0], dense[1], bank, p.gains.unsqueeze(0), out)
        got = model.fuse_batch([p])
        for a, b in zip(got.tensors(), want.tensors(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert got.down.abs().sum() > 0


def test_units_fused_into_scattered_slots_equal_the_batch_fusion(encoder, bank):
    """The cold path copies a units gather (its down side a transposed view) straight into the
    pool's slots, in any order: each slot then holds what fusing its profile alone gives."""
    model = MultiProfileModel(encoder, bank)
    makes = [{"k": 48}, {"k": 48, "out_scale": True}, {"k": 48, "tied": True}]
    profiles = [
        xpm.decode(xpm.encode(random_profile(bank, ProfileKind.UNITS, seed=40 + i, **m)), bank)
        for i, m in enumerate(makes)
    ]
    pool = SlotPool(6, bank.num_layers, bank.hidden_size, bank.bottleneck)
    slots = [5, 0, 3]
    model.fuse_into_pool(pool, slots, profiles)
    for slot, p in zip(slots, profiles, strict=True):
        alone = model.fuse_batch([p])
        assert all(t.is_contiguous() for t in alone.tensors())
        for pool_t, want in zip(pool.weights.tensors(), alone.tensors(), strict=True):
            torch.testing.assert_close(pool_t[:, slot : slot + 1], want, atol=0, rtol=0)
    assert (pool.weights.up[:, 5] - pool.weights.up[:, 0]).abs().max() > 1e-4  # the profiles differ


def test_hard_gather_equals_the_gemm_over_the_bank(encoder, bank):
    """Hard profiles fused by reading their selected adapters are the GEMM's weights, whatever their
    scale exponent, gains or per-adapter weights, and a batch mixing them predicts the same."""
    model = MultiProfileModel(encoder, bank)
    variants = [{}, {"scale_power": 0.5}, {"gains": True}, {"weighted": True, "gains": True}]
    profiles = [
        xpm.decode(xpm.encode(random_profile(bank, ProfileKind.HARD, seed=20 + i, **make)), bank)
        for i, make in enumerate(variants)
    ]
    gathered, gemm = model._fuse_hard(profiles), model._fuse_bank(profiles)
    for a, b in zip(gathered.tensors(), gemm.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (gathered.up[:, 0] - gathered.up[:, 3]).abs().max() > 1e-4  # the variants differ
    soft = xpm.decode(xpm.encode(random_profile(bank, ProfileKind.SOFT, seed=30)), bank)
    batch = [*profiles, soft]
    fused = model.fuse_batch(batch)  # hard by a gather, soft by the GEMM, in one batch
    want = FusedAdapters.cat([gemm, model._fuse_bank([soft])])
    for a, b in zip(fused.tensors(), want.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_hard_profiles_fuse_by_gather_until_they_read_4n_adapters_on_a_cpu(encoder, bank, monkeypatch):
    import xpeft.engine.runtime as runtime

    model = MultiProfileModel(encoder, bank)
    calls: list[tuple[str, int]] = []
    for name in ("fuse", "fuse_gather"):
        real = getattr(runtime, name)
        monkeypatch.setattr(
            runtime, name, lambda d, *a, _n=name, _r=real: calls.append((_n, d.shape[0])) or _r(d, *a)
        )
    k = random_profile(bank, ProfileKind.HARD, seed=0).k
    fits = 4 * bank.num_adapters // k  # this many profiles read 4 N adapters in all
    profiles = [random_profile(bank, ProfileKind.HARD, seed=s) for s in range(fits + 1)]
    model.fuse_batch(profiles[:fits])
    model.fuse_batch(profiles)
    assert calls == [("fuse_gather", fits), ("fuse", fits + 1)]
