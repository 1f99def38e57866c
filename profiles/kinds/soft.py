"""The ``soft`` kind: two fp16 softmax weight tensors ``(L, N)`` over the bank's adapters.

It fuses as mixing weights over every adapter, one GEMM over the bank (the ``mix`` fusion).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpeft.profiles.format_errors import ProfileFormatError
from xpeft.profiles.kinds.base import SCORE_FIELDS, Kind, KindParams, KindState, Shape, TrainSettings

if TYPE_CHECKING:
    import torch

    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.fusion import FusedAdapters
    from xpeft.profiles.format_codecs import Section


@dataclass(eq=False)
class SoftState(KindState):
    weights_down: torch.Tensor  # (L, N), each row a probability vector
    weights_up: torch.Tensor


class SoftParams(KindParams):
    """Two score tensors ``(L, N)``, turned into softmax weights at the current temperature."""

    def __init__(self, bank: AdapterBank, config: TrainSettings) -> None:
        import torch
        from torch import nn

        L, N, _, _ = bank.down.shape
        self.bank, self.config = bank, config
        self.scores_down = nn.Parameter(torch.randn(L, N) * config.score_init_std)
        self.scores_up = nn.Parameter(torch.randn(L, N) * config.score_init_std)

    def param_groups(self) -> list[dict]:
        return [{"params": self.score_tensors(), "lr": self.config.lr_scores, "weight_decay": 0.0}]

    def score_tensors(self) -> list[torch.Tensor]:
        return [self.scores_down, self.scores_up]

    def weights(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        from xpeft.profiles.masks import soft_weights

        return soft_weights(self.scores_down, temperature), soft_weights(self.scores_up, temperature)

    def fused(self, temperature: float, training: bool) -> FusedAdapters:
        from xpeft.adapters.fusion import fuse

        w_down, w_up = self.weights(temperature)
        return fuse(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank)

    def to_state(self, shape: Shape, temperature: float) -> SoftState:
        w_down, w_up = (w.detach().cpu().float() for w in self.weights(temperature))
        return SoftState(w_down, w_up)


class Soft(Kind):
    wire = "soft"
    uses_bank = True
    fusion = "mix"
    min_version = 1
    train_fields = SCORE_FIELDS
    state_type = SoftState
    bank_shapes = ("num_adapters", "bottleneck")

    def sections(self, shape: Shape, options: Mapping[str, object]) -> list[Section]:
        from xpeft.profiles.format_codecs import Section

        return [
            Section("weights_down", "f16", (shape.L, shape.N)),
            Section("weights_up", "f16", (shape.L, shape.N)),
        ]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: Shape, options: Mapping[str, object]
    ) -> SoftState:
        import torch

        ones = torch.ones(shape.L)
        for name in ("weights_down", "weights_up"):
            w = tensors[name]
            if bool((w < 0).any()) or not torch.allclose(w.sum(dim=1), ones, atol=2e-2):
                raise ProfileFormatError("bad_payload", f"{name} rows are not probability vectors")
        return SoftState(tensors["weights_down"], tensors["weights_up"])

    def mixing_weights(self, state: KindState | None, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(state, SoftState)
        return state.weights_down.float(), state.weights_up.float()

    def trainable(self, bank: AdapterBank, config: TrainSettings, k: int) -> SoftParams:
        return SoftParams(bank, config)

    def random(self, generator: torch.Generator, shape: Shape, **options: object) -> tuple[int, SoftState]:
        import torch

        super().random(generator, shape, **options)  # refuses options: a soft profile has none
        g, (L, N) = generator, (shape.L, shape.N)
        weights_down = torch.softmax(torch.randn(L, N, generator=g) * 2, -1)
        return 0, SoftState(weights_down, torch.softmax(torch.randn(L, N, generator=g) * 2, -1))
