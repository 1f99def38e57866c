"""The ``units`` kind (the shipped default): ``k`` bottleneck units per layer picked from the
bank's ``N*r``, one selection per projection (or one for both, ``tied``), per-layer gains and,
with ``out_scale``, a per-layer output scaling vector. Format version 3 and later.

A selection is stored as ``L*N*r`` bits or ``L*k`` ascending indices, whichever is smaller; it
fuses by a gather of the selected units, one call per ``k`` (the ``units`` fusion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpeft.profiles.constants import MAX_GAIN
from xpeft.profiles.format_errors import ProfileFormatError
from xpeft.profiles.kinds.base import (
    SCORE_FIELDS,
    SELECT_FIELDS,
    HeaderField,
    Kind,
    KindParams,
    KindState,
    Shape,
    TrainSettings,
    checked_gains,
)

if TYPE_CHECKING:
    import torch

    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.fusion import FusedAdapters
    from xpeft.profiles.format_codecs import Section

MAX_UNITS = 65536  # the most units a layer may select
UNITS_GAIN_INIT = 0.1  # the gains' default starting value (docs/METHOD.md)


@dataclass(eq=False)
class UnitsState(KindState):
    unit_index: torch.Tensor  # (2, L, k) int64, each row ascending; unit p is column p % r of adapter p // r
    gains: torch.Tensor  # (L,) positive gain of each layer's adapter output
    tied: bool = False  # one selection for both projections (both rows of unit_index equal)
    out_scale: torch.Tensor | None = None  # (L, d) scaling of each layer's adapter output


class UnitsParams(KindParams):
    """Scores over the ``N*r`` units of each layer (one tensor when tied), the per-layer gains and,
    with ``out_scale``, a per-layer output scaling vector."""

    def __init__(self, bank: AdapterBank, config: TrainSettings, k: int) -> None:
        import torch
        from torch import nn

        L, N, d, r = bank.down.shape
        self.bank, self.config, self.k = bank, config, k
        self.scores_down = nn.Parameter(torch.randn(L, N * r) * config.score_init_std)
        self.scores_up = (
            self.scores_down if config.tied else nn.Parameter(torch.randn(L, N * r) * config.score_init_std)
        )
        # starts at 1: the gain alone sets the strength
        self.out_scale = nn.Parameter(torch.ones(L, d)) if config.out_scale else None
        self.log_gain = nn.Parameter(torch.full((L,), math.log(config.resolved_gain_init())))

    def param_groups(self) -> list[dict]:
        c = self.config
        groups: list[dict] = [
            {"params": self.score_tensors(), "lr": c.lr_scores, "weight_decay": 0.0},
            {"params": [self.log_gain], "lr": c.lr_gain, "weight_decay": 0.0},
        ]
        if self.out_scale is not None:
            groups.append({"params": [self.out_scale], "lr": c.lr_out_scale, "weight_decay": 0.0})
        return groups

    def score_tensors(self) -> list[torch.Tensor]:
        return list(dict.fromkeys([self.scores_down, self.scores_up]))  # one tensor when tied

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        from xpeft.profiles.masks import khot

        return khot(self.scores_down.detach(), self.k), khot(self.scores_up.detach(), self.k)

    def gains(self) -> torch.Tensor:
        return self.log_gain.exp()

    def unit_weights(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's weight, ``(L, N*r)`` per projection: k-hot times the unit weight forward."""
        from xpeft.profiles.masks import unit_scale, unit_weights

        scale = unit_scale(self.k, self.bank.bottleneck)
        estimator = self.config.resolved_estimator()
        down = unit_weights(self.scores_down, self.k, temperature, estimator) * scale
        up = (
            down if self.config.tied else unit_weights(self.scores_up, self.k, temperature, estimator) * scale
        )
        return down, up

    def fused(self, temperature: float, training: bool) -> FusedAdapters:
        from xpeft.adapters.fusion import fuse_unit_weights

        w_down, w_up = self.unit_weights(temperature)
        gains = self.log_gain.exp().unsqueeze(0)
        out = None if self.out_scale is None else self.out_scale.unsqueeze(0)
        return fuse_unit_weights(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank, gains, out)

    def to_state(self, shape: Shape, temperature: float) -> UnitsState:
        import torch

        from xpeft.profiles.format_codecs import quantize_rows

        # the units the forward pass used: ascending ids of the k-hot rows
        index = torch.stack([torch.nonzero(m)[:, 1].view(shape.L, self.k) for m in self.masks()]).cpu()
        state = UnitsState(index, self.gains().detach().cpu().float().clone(), self.config.tied)
        if self.out_scale is not None:  # as the file holds it: int8 rows times an fp16 step
            q, step = quantize_rows(self.out_scale)
            state.out_scale = q.float() * step.unsqueeze(-1)
        return state


def _unit_index(tensors: Mapping[str, torch.Tensor], name: str, k: int) -> torch.Tensor:
    """``(L, k)`` ascending unit ids, from a k-hot mask or stored as such."""
    import torch

    rows = tensors[name]
    if rows.dtype is torch.bool:
        return torch.nonzero(rows)[:, 1].view(rows.shape[0], k)
    return rows


class Units(Kind):
    wire = "units"
    uses_bank = True
    fusion = "units"
    min_version = 3
    header_fields = (HeaderField("tied", False), HeaderField("out_scale", False))
    # a units profile always learns its per-layer gains: ``gain`` is not its to switch off
    train_fields = SCORE_FIELDS + SELECT_FIELDS + ("tied", "out_scale", "lr_out_scale")
    selects = True
    estimators = ("softmax", "identity")
    # every unit's score gets its gradient, so a dropped unit can come back (edge-popup's)
    default_estimator = "identity"
    # a units adapter starts at a fraction of one bank adapter's strength, which at full strength
    # all but replaces the encoder's features (docs/METHOD.md)
    default_gain_init = UNITS_GAIN_INIT
    state_type = UnitsState
    bank_shapes = ("num_adapters", "bottleneck")

    def k_bounds(self, N: int, r: int) -> tuple[int, int]:
        return 1, min(N * r, MAX_UNITS)

    def header_options(self, state: KindState | None) -> dict:
        assert isinstance(state, UnitsState)
        return {"tied": bool(state.tied), "out_scale": state.out_scale is not None}

    def sections(self, shape: Shape, options: Mapping[str, object]) -> list[Section]:
        from xpeft.profiles.format_codecs import Section, unit_selection

        L, P, k = shape.L, shape.N * shape.r, shape.k
        out = [unit_selection("unit_down", L, P, k)]
        if not options.get("tied", False):
            out.append(unit_selection("unit_up", L, P, k))
        out.append(Section("gains", "f16", (L,)))
        if options.get("out_scale", False):
            out += [Section("out_scale", "i8", (L, shape.d)), Section("out_scale_step", "f16", (L,))]
        return out

    def stored(self, state: KindState | None, section: Section, shape: Shape) -> torch.Tensor | None:
        import torch

        from xpeft.profiles.format_codecs import quantize_rows

        assert isinstance(state, UnitsState)
        name = section.name
        if name in ("unit_down", "unit_up"):  # a k-hot mask or the indices, as the section stores them
            index = state.unit_index[0 if name == "unit_down" else 1]
            if section.codec == "index":
                return index
            return torch.zeros(section.shape, dtype=torch.bool).scatter_(1, index, True)
        if name in ("out_scale", "out_scale_step") and state.out_scale is not None:
            return quantize_rows(state.out_scale)[0 if name == "out_scale" else 1]
        return super().stored(state, section, shape)

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: Shape, options: Mapping[str, object]
    ) -> UnitsState:
        import torch

        tied = bool(options.get("tied", False))
        down = _unit_index(tensors, "unit_down", shape.k)
        up = down if tied else _unit_index(tensors, "unit_up", shape.k)
        state = UnitsState(torch.stack([down, up]), tied=tied, gains=checked_gains(tensors))
        if options.get("out_scale", False):
            step = tensors["out_scale_step"]
            if not bool(((step > 0) & (step <= MAX_GAIN)).all()):
                raise ProfileFormatError("bad_payload", f"out_scale_step must lie in (0, {MAX_GAIN:g}]")
            state.out_scale = tensors["out_scale"].float() * step.unsqueeze(-1)
        return state

    def selection_pool(self, N: int, r: int) -> tuple[int, str]:
        return N * r, "N*r units"

    def default_k(self, N: int, r: int) -> int:
        return 4 * r

    def trainable(self, bank: AdapterBank, config: TrainSettings, k: int) -> UnitsParams:
        return UnitsParams(bank, config, k)

    def random(  # type: ignore[override]  # its own options
        self, generator: torch.Generator, shape: Shape, tied: bool = False, out_scale: bool = False
    ) -> tuple[int, UnitsState]:
        import torch

        from xpeft.profiles.format_codecs import quantize_rows
        from xpeft.profiles.masks import khot

        g, (L, N, d, r) = generator, shape[:4]
        k = shape.k or 4 * r
        rows = [torch.nonzero(khot(torch.randn(L, N * r, generator=g), k))[:, 1] for _ in range(2)]
        index = torch.stack(rows).view(2, L, k)
        unit_index = torch.stack([index[0], index[0]]) if tied else index
        state = UnitsState(unit_index, torch.rand(L, generator=g) * 0.5 + 0.1, tied)
        if out_scale:
            q, step = quantize_rows(torch.rand(L, d, generator=g) * 2 - 0.5)
            state.out_scale = q.float() * step.unsqueeze(-1)
        return k, state
