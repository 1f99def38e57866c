"""A profile: what one customer owns. Its kind's state (masks, unit ids, weights or one adapter)
plus a tiny head and, optionally, an abstention rule."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.profiles.abstain import AbstainRule
from xpeft.profiles.kinds import KINDS, Kind, KindState, ProfileKind, Shape
from xpeft.profiles.masks import unit_scale

__all__ = ["Profile", "ProfileKind"]

# The fields of every kind's state, with their defaults: a profile answers them by name (a field
# its kind does not hold reads as its default), as it did when they were fields of its own.
_STATE_FIELDS: dict[str, Any] = {
    f.name: None if f.default is MISSING else f.default
    for spec in KINDS.values()
    if spec.state_type is not None
    for f in fields(spec.state_type)
}


@dataclass(eq=False)  # identity, not tensor comparison
class Profile:
    """Everything needed to serve one profile against a given encoder and bank.

    ``state`` is the kind's own dataclass (:mod:`xpeft.profiles.kinds`): ``mask_down`` ...
    (hard), ``unit_index`` ... (units), ``weights_*`` (soft), ``adapter`` (single_adapter), or
    ``None`` (head_only); its fields read as attributes of the profile too. ``head_weight (C, d)``
    and ``head_bias (C,)`` map the pooled embedding to the C labels.
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
    state: KindState | None = None
    max_length: int = 128
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

    def __getattr__(self, name: str) -> Any:
        """A field of the kind's state (``profile.mask_down``); one its kind lacks is its default."""
        if name in _STATE_FIELDS:
            return getattr(self.__dict__.get("state"), name, _STATE_FIELDS[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def spec(self) -> Kind:
        """The kind's behaviour (its row of the kinds table)."""
        return KINDS[self.kind]

    @property
    def shape(self) -> Shape:
        return Shape(
            self.num_layers, self.num_adapters, self.hidden_size, self.bottleneck, len(self.labels), self.k
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
            *(self.state.tensors() if self.state is not None else []),
            self.abstain.knots if self.abstain else None,
            self.abstain.class_means if self.abstain else None,
        ]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def mixing_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_down, w_up)``, each ``(L, N)`` fp32, for the kinds that mix bank adapters."""
        return self.spec.mixing_weights(self.state, self.shape)

    def unit_weight(self) -> float:
        """What each selected unit weighs (units): the fused adapter then has one bank adapter's scale."""
        return unit_scale(self.k, self.bottleneck)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_down, mask_up)``, bool ``(L, N)`` k-hot (the kinds that store masks)."""
        masks = getattr(self.state, "masks", None)
        if masks is None:
            raise ValueError(f"a {self.kind.value} profile has no masks")
        return masks()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter of its own (the ``own`` fusion), by bank tensor name."""
        return self.spec.own_adapter(self.state)
