"""Training the units kind: it learns, it serves exactly what it trained, and its settings are checked."""

from __future__ import annotations

import pytest
import torch

from xpeft.adapters.errors import XPeftError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.kinds import ProfileKind
from xpeft.training.evaluate import evaluate
from xpeft.training.train import TrainConfig, train_profile

FAST = {"epochs": 4, "batch_size": 16, "max_length": 16}


@pytest.mark.parametrize("options", [{"k": 32}, {"k": 96, "tied": True, "out_scale": True}])
def test_units_learn_and_serve_what_was_trained(encoder, bank, separable, options):
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = train_profile(
        encoder,
        bank,
        separable,
        TrainConfig(method="units", **FAST, **options),
        eval_data=separable,
        progress=False,
    )
    profile = xpm.decode(xpm.encode(result.profile), bank)
    assert profile.kind is ProfileKind.UNITS and profile.k == options["k"]
    assert profile.tied is options.get("tied", False)
    assert profile.unit_index.shape == (2, bank.num_layers, options["k"])
    assert (profile.out_scale is not None) is options.get("out_scale", False)
    metrics = evaluate(MultiProfileModel(encoder, bank), profile, separable)
    assert metrics["accuracy"] >= 0.9, metrics
    # the served profile scores what training measured on the same data at its last step
    assert metrics["accuracy"] == pytest.approx(result.history[-1]["eval_accuracy"], abs=1.5 / len(separable))
    assert 0.0 <= result.diagnostics["mask_overlap_down"] <= 1.0
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k


def test_tied_units_train_one_score_tensor(encoder, bank, separable):
    from xpeft.training.trainable import Trainable

    tied = Trainable("units", bank, 2, TrainConfig(method="units", tied=True, k=32))
    separate = Trainable("units", bank, 2, TrainConfig(method="units", k=32))
    count = lambda t: sum(p.numel() for g in t.param_groups() for p in g["params"])  # noqa: E731
    assert count(separate) - count(tied) == bank.num_layers * bank.num_adapters * bank.bottleneck


def test_units_default_k_is_four_bottlenecks(bank):
    assert TrainConfig(method="units").resolved_k(bank.num_adapters, bank.bottleneck) == 4 * bank.bottleneck


@pytest.mark.parametrize(
    "config,match",
    [
        ({"method": "units", "k": 20 * 24 + 1}, "k=481"),
        ({"method": "hard", "tied": True}, "tied applies to units"),
        ({"method": "hard", "out_scale": True}, "out_scale applies to units"),
        ({"method": "units", "gain": False}, "gain applies to hard"),
        ({"method": "units", "scale_power": 0.5}, "scale_power applies to hard"),
        ({"method": "units", "lr_out_scale": -1.0}, "lr_out_scale"),
        ({"method": "units", "score_optimizer": "rmsprop"}, "score_optimizer 'rmsprop' is not one of"),
        ({"method": "head_only", "score_optimizer": "sgd"}, "score_optimizer applies to"),
    ],
)
def test_units_settings_are_checked(encoder, bank, separable, config, match):
    with pytest.raises(XPeftError, match=match):
        train_profile(encoder, bank, separable, TrainConfig(**config), progress=False)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_score_optimizer_first_step(bank, name):
    """Adam's first step moves every score by its rate whatever its gradient; the SGD path moves
    each score in proportion to its gradient, each layer's step at the rate in root mean square."""
    from xpeft.training.train import _optimizers
    from xpeft.training.trainable import Trainable

    lr = 0.05
    config = TrainConfig(method="units", k=32, lr_scores=lr, score_optimizer=name)
    trainable = Trainable("units", bank, 2, config)
    optimizers = _optimizers(trainable, config)
    scores = trainable.score_tensors()
    before = [s.detach().clone() for s in scores]
    weights = [torch.randn_like(s) * torch.linspace(0.1, 10.0, s.shape[-1]) for s in scores]
    loss = sum((w * s).sum() for w, s in zip(weights, scores, strict=True))
    for o in optimizers:
        o.zero_grad()
    loss.backward()
    for o in optimizers:
        o.step()
    for s, b, w in zip(scores, before, weights, strict=True):
        step = (b - s.detach()).double()
        if name == "adam":  # sign-like: every score moves by about lr
            assert torch.allclose(step.abs(), torch.full_like(step, lr), rtol=1e-3)
        else:
            rms = w.double().pow(2).mean(-1, keepdim=True).sqrt()
            assert torch.allclose(step, lr * w.double() / rms, rtol=1e-4, atol=1e-9)
            assert torch.allclose(
                step.pow(2).mean(-1).sqrt(), torch.full((s.shape[0],), lr, dtype=torch.double)
            )
    # the gain and the head still step with AdamW in both cases
    assert any(isinstance(o, torch.optim.AdamW) for o in optimizers)
