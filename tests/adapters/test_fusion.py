"""Fusion equals the explicit weighted sum; a one-hot mask reproduces that adapter exactly."""

from __future__ import annotations

import torch

from xpeft.adapters.fusion import FusedAdapters, fuse, fuse_gather
from xpeft.adapters.layer import apply_adapters
from xpeft.profiles.masks import khot


def test_fused_weights_equal_explicit_weighted_sum(bank):
    g = torch.Generator().manual_seed(1)
    U, L, N = 3, bank.num_layers, bank.num_adapters
    w_down = torch.softmax(torch.randn(U, L, N, generator=g), -1)
    w_up = torch.softmax(torch.randn(U, L, N, generator=g), -1)
    fused = fuse(w_down, w_up, bank)
    for u in range(U):
        for layer in range(L):
            down = sum(w_down[u, layer, i] * bank.down[layer, i] for i in range(N))
            up = sum(w_up[u, layer, i] * bank.up[layer, i] for i in range(N))
            down_bias = sum(w_down[u, layer, i] * bank.down_bias[layer, i] for i in range(N))
            up_bias = sum(w_up[u, layer, i] * bank.up_bias[layer, i] for i in range(N))
            torch.testing.assert_close(fused.down[layer, u], down, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.up[layer, u], up, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.down_bias[layer, u], down_bias, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fused.up_bias[layer, u], up_bias, atol=1e-5, rtol=1e-5)


def test_one_hot_mask_reproduces_the_adapter_exactly(bank):
    L, N = bank.num_layers, bank.num_adapters
    chosen = 7
    w = torch.zeros(1, L, N)
    w[:, :, chosen] = 1.0
    fused = fuse(w, w, bank)
    torch.testing.assert_close(fused.down[:, 0], bank.down[:, chosen], atol=0, rtol=0)
    torch.testing.assert_close(fused.up[:, 0], bank.up[:, chosen], atol=0, rtol=0)
    h = torch.randn(2, 5, bank.hidden_size)
    for layer in range(L):
        ref = (
            h
            + torch.relu(h @ bank.down[layer, chosen] + bank.down_bias[layer, chosen])
            @ bank.up[layer, chosen]
            + bank.up_bias[layer, chosen]
        )
        torch.testing.assert_close(apply_adapters(h, *fused.layer(layer), None), ref, atol=0, rtol=0)


def test_gather_equals_gemm_for_k_hot(bank):
    g = torch.Generator().manual_seed(2)
    U, L, N, k = 4, bank.num_layers, bank.num_adapters, 5
    scores = torch.randn(2, U, L, N, generator=g)
    masks = khot(scores, k)
    index = torch.topk(scores, k, dim=-1).indices
    gemm = fuse(masks[0].float() / k, masks[1].float() / k, bank)
    gather = fuse_gather(index[0], index[1], bank)
    for a, b in zip(gemm.tensors(), gather.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # with a weight for each selected adapter: the GEMM with those weights at the selected places
    weights = torch.rand(2, U, L, k, generator=g)
    dense = torch.zeros(2, U, L, N).scatter_(-1, index, weights)
    gemm = fuse(dense[0], dense[1], bank)
    gather = fuse_gather(index[0], index[1], bank, weights[0], weights[1])
    for a, b in zip(gemm.tensors(), gather.tensors(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_split_and_cat_round_trip(bank):
    w = torch.softmax(torch.randn(3, bank.num_layers, bank.num_adapters), -1)
    fused = fuse(w, w, bank)
    again = FusedAdapters.cat(fused.split())
    for a, b in zip(fused.tensors(), again.tensors(), strict=True):
        assert torch.equal(a, b)
