"""A profile: what one customer owns. Masks (or weights, or one adapter) plus a tiny head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.profiles.abstain import AbstainRule
from xpeft.profiles.kinds import ProfileKind
from xpeft.profiles.masks import mask_to_weights, unit_scale

__all__ = ["Profile", "ProfileKind"]


@dataclass(eq=False)  # identity, not tensor comparison
class Profile:
    """Everything needed to serve one profile against a given encoder and bank.

    ``mask_*`` are bool ``(L, N)`` (hard), ``weights_*`` float ``(L, N)`` (soft), ``unit_index``
    the ``k`` bank units of each layer, ascending, for the down and the up projection ``(2, L, k)``
    (units; unit ``p`` is column ``p % r`` of adapter ``p // r``), ``adapter`` holds
    ``down (L,d,r)``, ``down_bias (L,r)``, ``up (L,r,d)``, ``up_bias (L,d)`` (adapter kind).
    ``head_weight (C, d)`` and ``head_bias (C,)`` map the pooled embedding to the C labels.
    """

    kind: ProfileKind
    bank_id: str
    model_id: str
    num_layers: int
    num_adapters: int
    hidden_size: int
    bottleneck: int
    labels: list[str]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    k: int = 0
    mask_down: torch.Tensor | None = None
    mask_up: torch.Tensor | None = None
    weights_down: torch.Tensor | None = None
    weights_up: torch.Tensor | None = None
    adapter: dict[str, torch.Tensor] | None = None
    max_length: int = 128
    scale_power: float = 1.0  # hard: a selected adapter weighs 1 / k**p
    gains: torch.Tensor | None = None  # hard: (L,) positive gain of each layer's fused adapter
    values: torch.Tensor | None = None  # hard: (2, L, N) weight of each selected adapter (0 elsewhere)
    unit_index: torch.Tensor | None = None  # units: (2, L, k) int64, each row ascending
    tied: bool = False  # units: one selection for both projections (both rows of unit_index equal)
    out_scale: torch.Tensor | None = None  # units: (L, d) scaling of each layer's adapter output
    meta: dict[str, str] = field(default_factory=dict)
    abstain: AbstainRule | None = None  # the out-of-scope rule; None: never abstains

    @classmethod
    def for_bank(
        cls,
        kind: ProfileKind,
        bank: AdapterBank,
        labels: list[str],
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
        max_length: int = 128,
        meta: dict[str, str] | None = None,
    ) -> Profile:
        """A profile of ``kind`` shaped for ``bank``, with its head and nothing else set yet."""
        L, N, d, r = bank.down.shape
        return cls(
            kind=kind,
            bank_id=bank.bank_id,
            model_id=bank.model_id,
            num_layers=L,
            num_adapters=N,
            hidden_size=d,
            bottleneck=r,
            labels=labels,
            max_length=max_length,
            meta=meta or {},
            head_weight=head_weight,
            head_bias=head_bias,
        )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors in memory: what a host cache of decoded profiles must budget for
        (a few hundred bytes for a hard profile's masks, most of a megabyte for a whole adapter)."""
        tensors = [
            self.head_weight,
            self.head_bias,
            self.mask_down,
            self.mask_up,
            self.weights_down,
            self.weights_up,
            self.gains,
            self.values,
            self.unit_index,
            self.out_scale,
            self.abstain.knots if self.abstain else None,
            self.abstain.class_means if self.abstain else None,
            *(self.adapter or {}).values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_down, w_up)``, each ``(L, N)`` fp32, for the bank kinds."""
        if self.kind is ProfileKind.HARD:
            out = []
            for i, mask in enumerate(self.masks()):
                if self.values is not None:  # each selected adapter's own weight
                    w = mask.to(torch.float32) * self.values[i].float()
                else:
                    w = mask_to_weights(mask, self.k, self.scale_power)
                if self.gains is not None and i == 1:  # on the up projection: scales the output
                    w = w * self.gains.float().unsqueeze(-1)
                out.append(w)
            return out[0], out[1]
        if self.kind is ProfileKind.SOFT:
            assert self.weights_down is not None and self.weights_up is not None
            return self.weights_down.float(), self.weights_up.float()
        raise ValueError(f"a {self.kind.value} profile has no mixing weights")

    def unit_weight(self) -> float:
        """What each selected unit weighs (units): the fused adapter then has one bank adapter's scale."""
        return unit_scale(self.k, self.bottleneck)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_down, mask_up)``, bool ``(L, N)`` k-hot (hard only)."""
        assert self.mask_down is not None and self.mask_up is not None, "only hard profiles have masks"
        return self.mask_down, self.mask_up

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        assert self.adapter is not None
        return {name: self.adapter[name] for name in TENSOR_NAMES}
