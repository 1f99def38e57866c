"""The straight-through estimator: exact k-hot / k forward, softmax gradients backward."""

from __future__ import annotations

import pytest
import torch

from xpeft.profiles.masks import hard_weights, khot, soft_weights


def test_hard_weights_are_exactly_k_hot_over_k_and_scores_get_gradients():
    torch.manual_seed(0)
    scores = torch.randn(6, 50, requires_grad=True)
    k = 5
    w = hard_weights(scores, k)
    assert torch.equal(w.detach(), khot(scores.detach(), k).float() / k)  # bit-exact, not merely close
    assert set(w.detach().unique().tolist()) == {0.0, torch.tensor(1.0 / k).item()}
    assert torch.equal((w.detach() > 0).sum(-1), torch.full((6,), k))
    assert torch.equal(w.detach() > 0, khot(scores.detach(), k))
    # a loss that depends on the weights reaches the scores through the softmax
    target = torch.randn(6, 50)
    (w * target).sum().backward()
    assert scores.grad is not None
    assert scores.grad.abs().sum() > 0
    assert torch.count_nonzero(scores.grad) > 6 * k  # the gradient reaches unselected adapters too


def test_soft_weights_are_a_softmax():
    scores = torch.randn(3, 10)
    w = soft_weights(scores, temperature=2.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    torch.testing.assert_close(w, torch.softmax(scores / 2.0, -1))


@pytest.mark.parametrize("k", [0, 11])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError):
        hard_weights(torch.randn(2, 10), k)
