"""One forward pass serves rows of many profiles, each row as if it ran alone."""

from __future__ import annotations

import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.runtime import MultiProfileModel
from xpeft.profiles.synthetic import random_profile

TEXTS = [
    "a gripping, beautifully acted film",
    "the plot is dull",
    "It was fine, I suppose.",
    "I would not recommend this to anyone at all, really, not even my worst enemy",
    "great",
    "Terrible service and cold food.",
]


def test_mixed_batch_matches_each_row_alone(encoder, bank):
    model = MultiProfileModel(encoder, bank)
    kinds = [
        ProfileKind.HARD,
        ProfileKind.SOFT,
        ProfileKind.SINGLE_ADAPTER,
        ProfileKind.HEAD_ONLY,
        ProfileKind.HARD,
    ]
    profiles = [
        xpm.decode(xpm.encode(random_profile(bank, kind, seed=i, labels=["a", "b", "c"][: 2 + i % 2])), bank)
        for i, kind in enumerate(kinds)
    ]
    # a version-2 hard profile (scale exponent, gains, per-adapter weights) in the same batch
    extras = random_profile(bank, ProfileKind.HARD, seed=9, scale_power=0.75, gains=True, weighted=True)
    profiles.append(xpm.decode(xpm.encode(extras), bank))
    # every profile gets rows, interleaved, so the batch mixes them row by row
    requests = [
        (profiles[i % len(profiles)], [TEXTS[i % len(TEXTS)], TEXTS[(i + 3) % len(TEXTS)]]) for i in range(12)
    ]
    inputs = [t for _, texts in requests for t in texts]
    distinct = list({id(p): p for p, _ in requests}.values())
    rows = [distinct.index(p) for p, texts in requests for _ in texts]
    mixed = model.logits(inputs, rows, distinct, model.fuse(distinct))
    for text, row, logits in zip(inputs, rows, mixed, strict=True):
        alone = model.logits([text], [0], [distinct[row]], model.fuse([distinct[row]]))[0]
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    # and the profiles really differ from one another, so the test could fail
    first = model.logits([TEXTS[0]], [0], [profiles[0]], model.fuse([profiles[0]]))[0]
    other = model.logits([TEXTS[0]], [0], [profiles[4]], model.fuse([profiles[4]]))[0]
    assert (first - other).abs().max() > 1e-3


def test_fuse_runs_once_per_distinct_profile(encoder, bank, monkeypatch):
    model = MultiProfileModel(encoder, bank)
    p, q = random_profile(bank, seed=1), random_profile(bank, seed=2)
    calls = []
    import xpeft.profiles.runtime as runtime

    real = runtime.fuse

    def counting(w_down, w_up, b):
        calls.append(w_down.shape[0])
        return real(w_down, w_up, b)

    monkeypatch.setattr(runtime, "fuse", counting)
    answers = model.predict_batch([(p, ["x", "y", "z"]), (q, ["u"]), (p, ["v", "w"])])
    assert calls == [2]  # one batched fusion, U = 2 distinct profiles, not one per row
    assert [len(a) for a in answers] == [3, 1, 2]


def test_head_only_adapter_adds_nothing(encoder, bank):
    enc = encoder.tokenize(TEXTS)
    with torch.no_grad():
        plain = encoder(enc)
        zero = encoder(enc, FusedAdapters.zeros(bank.num_layers, bank.hidden_size, bank.bottleneck))
    torch.testing.assert_close(plain, zero, atol=0, rtol=0)
