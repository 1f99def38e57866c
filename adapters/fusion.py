"""Fusion: turn mixing weights over the bank into one adapter per profile.

``A_l = sum_i w[l, i] A[l, i]`` for U profiles at once is one batched GEMM over the layers:
``(L, U, N) @ (L, N, d*r)``. A gather that reads only the k selected adapters is the other
path for hard masks, cheaper when few profiles select few of many adapters; the runtime picks
per batch (docs/BENCHMARKS.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xpeft.adapters import kernels
from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.adapters.kernels import KernelChoice


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


def fuse_gather(
    index_down: torch.Tensor,
    index_up: torch.Tensor,
    bank: AdapterBank,
    weight_down: torch.Tensor | None = None,
    weight_up: torch.Tensor | None = None,
    choice: KernelChoice | None = None,
) -> FusedAdapters:
    """Hard masks: read only the k selected adapters of each profile and sum them.

    ``index_down`` / ``index_up``: ``(U, L, k)`` adapter indices; ``weight_*`` each one's weight
    (``None``: 1/k, which equals :func:`fuse` with k-hot / k weights). On CUDA with Triton, where
    ``choice`` turns the ``gather`` kernel on, the unweighted mean runs as a kernel; otherwise
    ``embedding_bag`` sums the rows without copying them.
    """
    L, N = bank.num_layers, bank.down.shape[1]
    U, _, k = index_down.shape
    offsets = torch.arange(0, U * L * k, k, device=index_down.device)

    def pick(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None and choice is not None and choice.enabled("gather", table):  # CUDA + Triton
            return kernels.gather_mean_triton(table, index)  # reads the k rows without copying them
        ids = (index + torch.arange(L, device=index.device).view(1, L, 1) * N).flatten()
        rows = table.reshape(L * N, -1)
        if weight is None:
            bags = F.embedding_bag(ids, rows, offsets, mode="mean")
        else:
            psw = weight.flatten().to(rows.dtype)
            bags = F.embedding_bag(ids, rows, offsets, mode="sum", per_sample_weights=psw)
        # (U*L, ...) -> layer-major (L, U, ...)
        return bags.view(U, L, *table.shape[2:]).transpose(0, 1).contiguous()

    return FusedAdapters(
        pick(bank.down, index_down, weight_down),
        pick(bank.down_bias, index_down, weight_down),
        pick(bank.up, index_up, weight_up),
        pick(bank.up_bias, index_up, weight_up),
    )


# -- units: k bottleneck units per layer out of the bank's N*r -------------------------------------
# Unit p of a layer is column j = p % r of adapter i = p // r: its down column A[l, i][:, j], its down
# bias a[l, i][j] and its up row B[l, i][j, :]. A profile's fused adapter keeps the bank's shape: the
# selected units of position j are summed into column (and row) j, each times ``scale``; the up side
# is then multiplied by the layer's gain and, optionally, its output scaling vector. The adapters'
# own up biases belong to no unit: a units profile's up bias is zero.


def _unit_output(up: torch.Tensor, gains: torch.Tensor, out_scale: torch.Tensor | None) -> torch.Tensor:
    """``up (L, U, r, d)`` times each profile's per-layer gain ``(U, L)`` and output scale ``(U, L, d)``."""
    up = up * gains.transpose(0, 1)[:, :, None, None]
    if out_scale is not None:
        up = up * out_scale.transpose(0, 1).unsqueeze(2)
    return up


def fuse_unit_weights(
    weights_down: torch.Tensor,
    weights_up: torch.Tensor,
    bank: AdapterBank,
    gains: torch.Tensor,
    out_scale: torch.Tensor | None = None,
) -> FusedAdapters:
    """Dense and differentiable, for training: ``weights_* (U, L, N*r)`` over every unit (k-hot
    times the unit weight in the forward pass), ``gains (U, L)``, ``out_scale (U, L, d)`` or None."""
    L, N, d, r = bank.down.shape
    U = weights_down.shape[0]
    wd = weights_down.to(bank.down.dtype).view(U, L, N, r)
    wu = weights_up.to(bank.up.dtype).view(U, L, N, r)
    down = torch.einsum("ulnj,lndj->ludj", wd, bank.down)
    down_bias = torch.einsum("ulnj,lnj->luj", wd, bank.down_bias)
    up = _unit_output(torch.einsum("ulnj,lnjd->lujd", wu, bank.up), gains, out_scale)
    up_bias = torch.zeros(L, U, d, dtype=up.dtype, device=up.device)
    return FusedAdapters(down, down_bias, up, up_bias)


@dataclass
class UnitTable:
    """The bank as rows of units, layer-major: ``down (L*N*r, d)`` (each unit's down column as a
    row), ``down_bias (L*N*r,)`` and ``up (L*N*r, d)``; built once per bank and device, so a gather
    reads contiguous rows. The bias stays apart: appended to its column, it would make rows of
    d + 1 numbers, which put every row but the first off the alignment of ``embedding_bag``'s vector
    loads."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    num_layers: int
    bottleneck: int

    @classmethod
    def of(cls, bank: AdapterBank) -> UnitTable:
        L, N, d, r = bank.down.shape
        return cls(
            down=bank.down.permute(0, 1, 3, 2).reshape(L * N * r, d).contiguous(),
            down_bias=bank.down_bias.reshape(L * N * r).contiguous(),
            up=bank.up.reshape(L * N * r, d).contiguous(),
            num_layers=L,
            bottleneck=r,
        )

    @property
    def units_per_layer(self) -> int:
        return self.up.shape[0] // self.num_layers


def fuse_units(
    index_down: torch.Tensor,
    index_up: torch.Tensor,
    scale: torch.Tensor,
    gains: torch.Tensor,
    out_scale: torch.Tensor | None,
    table: UnitTable,
) -> FusedAdapters:
    """Serving: each profile's selected units summed into their positions, by ``embedding_bag``.

    ``index_* (U, L, k)`` unit ids within their layer (the same k for every profile of the call),
    ``scale (U,)`` each profile's unit weight, ``gains (U, L)``, ``out_scale (U, L, d)`` or None.
    One bag per (layer, profile, position): reads ``2 * U * L * k`` rows of the table, never the
    whole bank, and never materialises them (a gather then a sum copied every row first, 5-10x
    slower on a CPU; docs/BENCHMARKS.md).

    Cold batches fuse many profiles at once, so the output is written as few times as possible:
    the bags come out layer-major and the layer's gain rides in each up unit's weight. The down
    side is returned as a transposed view, which the copy into the slot pool reads in place.
    Callers that need contiguous tensors make them.
    """
    U, L, k = index_down.shape
    r, d = table.bottleneck, table.up.shape[1]
    dtype = table.up.dtype
    w = scale.to(dtype).view(U, 1, 1).expand(U, L, k)
    down_bags = _UnitBags(index_down, w, table)
    down = down_bags.sum(table.down).view(L, U, r, d)
    down_bias = down_bags.sum_scalars(table.down_bias).view(L, U, r)
    up = _UnitBags(index_up, w * gains.to(dtype).view(U, L, 1), table).sum(table.up).view(L, U, r, d)
    if out_scale is not None:
        up = up * out_scale.to(dtype).transpose(0, 1).unsqueeze(2)
    up_bias = torch.zeros(L, U, d, dtype=dtype, device=up.device)
    return FusedAdapters(down.transpose(2, 3), down_bias, up, up_bias)


class _UnitBags:
    """The bags of one projection's selections, layer-major: bag ``(l, u, j)`` holds the units of
    layer l, profile u, position j, each with its weight (an empty bag sums to zero).

    Each (profile, layer) row of k units is put in position order by a batched sort of its own
    k positions, then the rows are laid out layer-major: no global sort of all ``U * L * k`` ids.
    """

    def __init__(self, index: torch.Tensor, weight: torch.Tensor, table: UnitTable) -> None:
        U, L, k = index.shape
        r, P = table.bottleneck, table.units_per_layer
        device = index.device
        position, order = torch.sort(index % r, dim=-1, stable=True)
        layers = torch.arange(L, device=device).view(L, 1, 1)
        layer_major = layers * U + torch.arange(U, device=device).view(1, U, 1)
        self.ids = (index.gather(-1, order).transpose(0, 1) + layers * P).flatten()
        self.weights = weight.gather(-1, order).transpose(0, 1).flatten()
        bag = (layer_major * r + position.transpose(0, 1)).flatten()  # ascending: no sort needed
        # where each bag starts (searchsorted, not bincount: no device sync on a GPU)
        self.offsets = torch.searchsorted(bag, torch.arange(L * U * r, device=device))

    def sum(self, rows: torch.Tensor) -> torch.Tensor:
        """``(L*U*r, width)``: each bag's weighted sum of its units' rows of ``rows``."""
        return F.embedding_bag(
            self.ids, rows, self.offsets, mode="sum", per_sample_weights=self.weights.to(rows.dtype)
        )

    def sum_scalars(self, values: torch.Tensor) -> torch.Tensor:
        """``(L*U*r,)``: each bag's weighted sum of its units' entries of ``values`` (the same bags
        over rows of one number: the same order of addition on every device)."""
        return self.sum(values.view(-1, 1)).view(-1)
