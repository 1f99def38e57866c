"""Training: hard masks learn a separable task fast; only the profile's own parameters move."""

from __future__ import annotations

import pytest
import torch

from xpeft.adapters.errors import XPeftError
from xpeft.profiles import format as xpm
from xpeft.profiles.evaluate import evaluate
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.runtime import MultiProfileModel
from xpeft.profiles.train import TrainConfig, train_profile

FAST = {"epochs": 4, "batch_size": 16, "max_length": 16}


def test_hard_masks_learn_a_separable_task(encoder, bank, separable):
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    bank_before = {k: v.clone() for k, v in bank.tensors().items()}
    result = train_profile(encoder, bank, separable, TrainConfig(method="hard", k=4, **FAST), progress=False)
    profile = xpm.decode(xpm.encode(result.profile), bank)  # score what would be served
    metrics = evaluate(MultiProfileModel(encoder, bank), profile, separable)
    assert metrics["accuracy"] >= 0.9, metrics
    assert metrics["n"] == len(separable)
    assert profile.kind is ProfileKind.HARD and profile.k == 4
    assert torch.equal(profile.mask_down.sum(1), torch.full((bank.num_layers,), 4))
    # frozen means frozen: encoder and bank are bit-identical after training
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k
    for k, v in bank.tensors().items():
        assert torch.equal(v, bank_before[k]), k
    assert len(result.history) == 4 * 4 and result.history[-1]["loss"] < result.history[0]["loss"]


def test_fixed_seed_gives_the_same_profile(encoder, bank, separable):
    config = TrainConfig(method="hard", k=3, seed=11, epochs=1, batch_size=16, max_length=16)
    a = xpm.encode(train_profile(encoder, bank, separable, config, progress=False).profile)
    b = xpm.encode(train_profile(encoder, bank, separable, config, progress=False).profile)
    assert a == b
    config.seed = 12
    c = xpm.encode(train_profile(encoder, bank, separable, config, progress=False).profile)
    assert c != a


@pytest.mark.parametrize(
    "method,kind",
    [
        ("soft", ProfileKind.SOFT),
        ("single_adapter", ProfileKind.SINGLE_ADAPTER),
        ("head_only", ProfileKind.HEAD_ONLY),
    ],
)
def test_other_methods_train_their_own_kind(encoder, bank, separable, method, kind):
    result = train_profile(encoder, bank, separable, TrainConfig(method=method, **FAST), progress=False)
    profile = xpm.decode(xpm.encode(result.profile), bank)
    assert profile.kind is kind
    metrics = evaluate(MultiProfileModel(encoder, bank), profile, separable)
    assert metrics["accuracy"] >= 0.8, (method, metrics)


def test_eval_curve_and_bad_arguments(encoder, bank, separable):
    result = train_profile(
        encoder,
        bank,
        separable,
        TrainConfig(method="hard", k=2, epochs=1, batch_size=16, max_length=16, eval_every=2),
        eval_data=separable,
        progress=False,
    )
    assert [r["step"] for r in result.history if "eval_accuracy" in r] == [2, 4]
    with pytest.raises(XPeftError, match="k=99"):
        train_profile(encoder, bank, separable, TrainConfig(method="hard", k=99), progress=False)
    with pytest.raises(XPeftError, match="unknown method"):
        train_profile(encoder, bank, separable, TrainConfig(method="lora"), progress=False)
