"""Fusion: turn mixing weights over the bank into one adapter per profile.

``A_l = sum_i w[l, i] A[l, i]`` for U profiles at once is one batched GEMM over the layers:
``(L, U, N) @ (L, N, d*r)``. A gather that reads only the k selected adapters is the other
candidate for hard masks; both are here so the benchmark can compare them (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xpeft.adapters import kernels
from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank


@dataclass
class FusedAdapters:
    """Adapter weights of U profiles for every layer, layer-major.

    Shapes: ``down (L, U, d, r)``, ``down_bias (L, U, r)``, ``up (L, U, r, d)``, ``up_bias (L, U, d)``.
    A head-only profile is all zeros: its adapter adds exactly nothing.
    """

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor

    @property
    def num_profiles(self) -> int:
        return self.down.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in TENSOR_NAMES)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.down[index], self.down_bias[index], self.up[index], self.up_bias[index]

    def split(self) -> list[FusedAdapters]:
        """One ``U=1`` entry per profile (what the fused-weight cache stores)."""
        return [
            FusedAdapters(*(t[:, u : u + 1].contiguous() for t in self.tensors()))
            for u in range(self.num_profiles)
        ]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FusedAdapters:
        return FusedAdapters(*(t.to(device=device, dtype=dtype) for t in self.tensors()))

    @staticmethod
    def cat(parts: Sequence[FusedAdapters]) -> FusedAdapters:
        if len(parts) == 1:
            return parts[0]
        return FusedAdapters(
            *(torch.cat(ts, dim=1) for ts in zip(*(p.tensors() for p in parts), strict=True))
        )

    @staticmethod
    def zeros(
        num_layers: int,
        hidden_size: int,
        bottleneck: int,
        num_profiles: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> FusedAdapters:
        L, U, d, r = num_layers, num_profiles, hidden_size, bottleneck
        return FusedAdapters(
            torch.zeros(L, U, d, r, device=device, dtype=dtype),
            torch.zeros(L, U, r, device=device, dtype=dtype),
            torch.zeros(L, U, r, d, device=device, dtype=dtype),
            torch.zeros(L, U, d, device=device, dtype=dtype),
        )

    @staticmethod
    def from_single(adapter: dict[str, torch.Tensor]) -> FusedAdapters:
        """A single adapter (``down (L,d,r)``, ...) as a one-profile entry."""
        return FusedAdapters(*(adapter[n].unsqueeze(1) for n in TENSOR_NAMES))


def fuse(weights_down: torch.Tensor, weights_up: torch.Tensor, bank: AdapterBank) -> FusedAdapters:
    """Fuse U profiles in one batched GEMM per tensor.

    ``weights_down`` / ``weights_up``: ``(U, L, N)`` mixing weights (k-hot / k, or a softmax).
    Differentiable, so training runs the same code with U=1.
    """
    L, N, d, r = bank.down.shape
    wd = weights_down.to(bank.down.dtype).transpose(0, 1)  # (L, U, N)
    wu = weights_up.to(bank.up.dtype).transpose(0, 1)
    U = wd.shape[1]
    down = torch.bmm(wd, bank.down.reshape(L, N, d * r)).view(L, U, d, r)
    down_bias = torch.bmm(wd, bank.down_bias)
    up = torch.bmm(wu, bank.up.reshape(L, N, r * d)).view(L, U, r, d)
    up_bias = torch.bmm(wu, bank.up_bias)
    return FusedAdapters(down, down_bias, up, up_bias)


def fuse_gather(index_down: torch.Tensor, index_up: torch.Tensor, bank: AdapterBank) -> FusedAdapters:
    """Hard masks only: read the k selected adapters of each profile and average them.

    ``index_down`` / ``index_up``: ``(U, L, k)`` adapter indices. Equals :func:`fuse` with k-hot / k
    weights; kept as the gather candidate for benchmarks and the GPU kernel.
    """
    L = bank.num_layers
    layers = torch.arange(L, device=index_down.device).view(1, L, 1)

    def pick(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if kernels.enabled("gather", table):  # CUDA + Triton only
            return kernels.gather_mean_triton(table, index)  # reads the k rows without copying them
        # table (L, N, ...) -> (U, L, k, ...) -> mean over k -> layer-major (L, U, ...)
        return table[layers, index].mean(dim=2).transpose(0, 1).contiguous()

    return FusedAdapters(
        pick(bank.down, index_down),
        pick(bank.down_bias, index_down),
        pick(bank.up, index_up),
        pick(bank.up_bias, index_up),
    )
