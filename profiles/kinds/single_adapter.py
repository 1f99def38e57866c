"""The ``single_adapter`` kind (the paper's baseline): one whole Pfeiffer adapter of its own, fp16.

Files say ``adapter`` for it, as version 1 always did: the name on the wire stays, the Python
name is the method's. It reads no bank adapter (the ``own`` fusion copies its adapter into the
slot pool), so only the bottleneck must match the bank's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xpeft.profiles.kinds.base import Kind, KindParams, KindState, Shape, TrainSettings

if TYPE_CHECKING:
    import torch

    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.fusion import FusedAdapters
    from xpeft.profiles.format_codecs import Section


@dataclass(eq=False)
class AdapterState(KindState):
    adapter: dict[str, torch.Tensor]  # down (L,d,r), down_bias (L,r), up (L,r,d), up_bias (L,d)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        from xpeft.adapters.bank import TENSOR_NAMES

        return {name: self.adapter[name] for name in TENSOR_NAMES}


class AdapterParams(KindParams):
    """One adapter, identity at the start (up = 0), the usual adapter initialisation."""

    def __init__(self, bank: AdapterBank, config: TrainSettings) -> None:
        import torch
        from torch import nn

        L, _, d, r = bank.down.shape
        self.config = config
        self.down = nn.Parameter(torch.randn(L, d, r) * 0.02)
        self.down_bias = nn.Parameter(torch.zeros(L, r))
        self.up = nn.Parameter(torch.zeros(L, r, d))
        self.up_bias = nn.Parameter(torch.zeros(L, d))

    def param_groups(self) -> list[dict]:
        return [{"params": [self.down, self.down_bias, self.up, self.up_bias], "lr": self.config.lr_adapter}]

    def fused(self, temperature: float, training: bool) -> FusedAdapters:
        from xpeft.adapters.bank import TENSOR_NAMES
        from xpeft.adapters.fusion import FusedAdapters

        return FusedAdapters.from_single({n: getattr(self, n) for n in TENSOR_NAMES})

    def to_state(self, shape: Shape, temperature: float) -> AdapterState:
        from xpeft.adapters.bank import TENSOR_NAMES

        return AdapterState({n: getattr(self, n).detach().cpu().float().clone() for n in TENSOR_NAMES})


class SingleAdapter(Kind):
    wire = "adapter"
    fusion = "own"
    min_version = 1
    train_fields = ("lr_adapter",)
    state_type = AdapterState
    bank_shapes = ("bottleneck",)

    def sections(self, shape: Shape, options: Mapping[str, object]) -> list[Section]:
        from xpeft.adapters.bank import TENSOR_NAMES
        from xpeft.profiles.format_codecs import Section

        L, d, r = shape.L, shape.d, shape.r
        shapes = {"down": (L, d, r), "down_bias": (L, r), "up": (L, r, d), "up_bias": (L, d)}
        return [Section(name, "f16", shapes[name]) for name in TENSOR_NAMES]

    def stored(self, state: KindState | None, section: Section, shape: Shape) -> torch.Tensor | None:
        return self.own_adapter(state)[section.name]

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: Shape, options: Mapping[str, object]
    ) -> AdapterState:
        from xpeft.adapters.bank import TENSOR_NAMES

        return AdapterState({name: tensors[name] for name in TENSOR_NAMES})

    def own_adapter(self, state: KindState | None) -> dict[str, torch.Tensor]:
        assert isinstance(state, AdapterState)
        return state.adapter_tensors()

    def trainable(self, bank: AdapterBank, config: TrainSettings, k: int) -> AdapterParams:
        return AdapterParams(bank, config)

    def random(self, generator: torch.Generator, shape: Shape, **options: object) -> tuple[int, AdapterState]:
        import torch

        super().random(generator, shape, **options)  # refuses options: an adapter has none
        g, (L, _, d, r) = generator, shape[:4]
        return 0, AdapterState(
            {
                "down": torch.randn(L, d, r, generator=g) * d**-0.5,
                "down_bias": torch.randn(L, r, generator=g) * 0.1,
                "up": torch.randn(L, r, d, generator=g) * r**-0.5 * 0.2,
                "up_bias": torch.randn(L, d, generator=g) * 0.1,
            }
        )
