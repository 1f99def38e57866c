"""Training: hard masks learn a separable task fast; only the profile's own parameters move."""

from __future__ import annotations

import pytest
import torch

from xpeft.adapters.errors import XPeftError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import ProfileKind
from xpeft.training.evaluate import evaluate
from xpeft.training.train import TrainConfig, train_profile

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
    assert profile.gains is not None and profile.gains.shape == (bank.num_layers,)  # the default
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


def test_one_name_per_kind_and_a_torch_free_config():
    import subprocess
    import sys

    from xpeft.profiles.profile import ProfileKind
    from xpeft.training.train_config import METHODS

    assert sorted(METHODS) == sorted(kind.value for kind in ProfileKind)
    # the CLI builds its flags from TrainConfig without paying for torch
    code = "import sys, xpeft.training.train_config; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


@pytest.mark.parametrize(
    "options",
    [
        {"gain": True, "scale_power": 0.75},
        {"weighted": True},
        {"estimator": "identity"},
        {"estimator": "gumbel", "temperature_end": 0.2},
    ],
)
def test_hard_mask_options_train_and_serve_what_was_trained(encoder, bank, separable, options):
    config = TrainConfig(method="hard", k=3, **FAST, **options)
    result = train_profile(encoder, bank, separable, config, eval_data=separable, progress=False)
    served = xpm.decode(xpm.encode(result.profile), bank)
    # what the server computes from the file is what training measured at the end (fp16 aside)
    metrics = evaluate(MultiProfileModel(encoder, bank), served, separable)
    assert metrics["accuracy"] == pytest.approx(result.history[-1]["eval_accuracy"], abs=2 / len(separable))
    assert metrics["accuracy"] >= 0.8, (options, metrics)
    if options.get("gain"):
        assert served.gains is not None and served.gains.shape == (bank.num_layers,)
        assert not torch.allclose(served.gains, torch.ones(bank.num_layers))  # the gains did train
        assert served.scale_power == 0.75
    if options.get("weighted"):
        assert served.values is not None
        assert bool((served.values[~torch.stack(served.masks())] == 0).all())  # only selected ones
    diag = result.diagnostics
    assert 0.0 <= diag["mask_overlap_down"] <= 1.0 and len(diag["adapter_ratio_end"]) == bank.num_layers
    assert diag["score_grad_norm_first"] > 0


def test_temperature_schedule_and_unknown_estimator(encoder, bank, separable):
    from xpeft.training.train import _temperature

    config = TrainConfig(temperature=1.0, temperature_end=0.1)
    assert _temperature(config, 0, 11) == pytest.approx(1.0)
    assert _temperature(config, 10, 11) == pytest.approx(0.1)
    assert _temperature(TrainConfig(temperature=0.5), 7, 11) == 0.5
    with pytest.raises(XPeftError, match="estimator"):
        train_profile(encoder, bank, separable, TrainConfig(method="hard", estimator="magic"), progress=False)


def test_a_second_gain_on_the_down_mask_would_only_scale_the_first():
    # why a profile stores one gain per layer: relu(g x) B == relu(x) (g B) for g > 0
    g = torch.Generator().manual_seed(0)
    h, A, a, B = (
        torch.randn(5, 8, generator=g),
        torch.randn(8, 3, generator=g),
        torch.randn(3),
        torch.randn(3, 8),
    )
    for gain in (0.3, 2.5):
        torch.testing.assert_close(torch.relu(gain * (h @ A + a)) @ B, torch.relu(h @ A + a) @ (gain * B))


def test_train_config_validation_names_the_setting():
    TrainConfig().validate()
    TrainConfig(method="soft", lr_scores=0.2, temperature=0.5).validate()
    for bad, match in [
        (TrainConfig(method="hard", batch_size=0), "batch_size"),
        (TrainConfig(method="head_only", lr_scores=0.2), "lr_scores applies to hard, units and soft only"),
        (TrainConfig(method="soft", weighted=True), "weighted applies to hard only"),
        (TrainConfig(temperature_end=0.0), "temperature_end"),
        (TrainConfig(gain_init=0.0), "gain_init"),
        (TrainConfig(estimator="magic"), "estimator"),
        (TrainConfig(head_init="zeros"), "head_init"),
    ]:
        with pytest.raises(XPeftError, match=match):
            bad.validate()


def test_a_class_means_head_separates_the_labels_before_any_step(encoder, bank, separable, frozen_training):
    """With every rate at zero nothing trains, so the served head is the one training started from:
    from class means it already separates a separable task; from small random weights it does not."""
    model = MultiProfileModel(encoder, bank)
    scores = {}
    for init in ("normal", "class_means"):
        config = TrainConfig(method="units", k=8, head_init=init, abstain=False, **frozen_training)
        profile = train_profile(encoder, bank, separable, config, progress=False).profile
        scores[init] = evaluate(model, xpm.decode(xpm.encode(profile), bank), separable)["accuracy"]
        assert torch.isfinite(profile.head_weight).all() and torch.isfinite(profile.head_bias).all()
    assert scores["class_means"] >= 0.9, scores
    assert scores["normal"] < 0.8, scores
