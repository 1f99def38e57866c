"""The profile kinds, one row each: the table every other module reads instead of naming kinds.

A kind says what a profile stores and how it becomes an adapter. Its row gives the name files
use, whether it reads the bank, how it is fused, the oldest ``.xpm`` version that can hold it,
the optional header fields it may carry, and the training settings that only it reads. The
file sections of each kind are in :func:`xpeft.profiles.format.sections`, its trainable
parameters in :mod:`xpeft.training.trainable`; docs/ARCHITECTURE.md lists the files a new kind
touches. Importable without torch, like :mod:`xpeft.training.train_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ProfileKind(str, Enum):
    HARD = "hard"  # two bit-packed k-hot masks over the bank's adapters
    UNITS = "units"  # k bottleneck units per layer picked from the bank's N*r, as bits or indices
    SOFT = "soft"  # two fp16 softmax weight tensors over the bank's adapters
    SINGLE_ADAPTER = "single_adapter"  # baseline: one whole adapter of its own, fp16
    HEAD_ONLY = "head_only"  # baseline: no adapter at all

    @property
    def spec(self) -> KindSpec:
        return KINDS[self]

    @property
    def uses_bank(self) -> bool:
        return KINDS[self].uses_bank


@dataclass(frozen=True)
class KindSpec:
    """What the rest of the code needs to know about one kind."""

    wire: str  # the kind's name in .xpm headers
    uses_bank: bool  # a profile of this kind is refused by any other bank
    fusion: str  # "mix": weights over whole adapters (one GEMM); "units": a gather of bank units;
    #              "own": an adapter of its own, copied in; "none": an all-zero adapter
    min_version: int  # the oldest .xpm format version that can hold it
    header_fields: tuple[str, ...] = ()  # optional header fields, each needing format version 2+
    train_fields: tuple[str, ...] = ()  # TrainConfig fields that this kind's training reads
    selects: bool = False  # training picks a discrete selection whose overlap with its start is reported


_SCORE_FIELDS = ("lr_scores", "temperature", "temperature_end", "score_init_std")
_SELECT_FIELDS = ("k", "estimator", "gain_init", "lr_gain")

KINDS: dict[ProfileKind, KindSpec] = {
    ProfileKind.HARD: KindSpec(
        wire="hard",
        uses_bank=True,
        fusion="mix",
        min_version=1,
        header_fields=("scale_power", "gains", "values"),
        train_fields=_SCORE_FIELDS + _SELECT_FIELDS + ("gain", "scale_power", "weighted"),
        selects=True,
    ),
    ProfileKind.UNITS: KindSpec(
        wire="units",
        uses_bank=True,
        fusion="units",
        min_version=3,
        header_fields=("tied", "out_scale"),
        # a units profile always learns its per-layer gains: ``gain`` is not its to switch off
        train_fields=_SCORE_FIELDS + _SELECT_FIELDS + ("tied", "out_scale", "lr_out_scale"),
        selects=True,
    ),
    ProfileKind.SOFT: KindSpec(
        wire="soft", uses_bank=True, fusion="mix", min_version=1, train_fields=_SCORE_FIELDS
    ),
    # Files say "adapter" for a single_adapter profile, as version 1 always did: the name on the
    # wire stays, the Python name is the method's.
    ProfileKind.SINGLE_ADAPTER: KindSpec(
        wire="adapter", uses_bank=False, fusion="own", min_version=1, train_fields=("lr_adapter",)
    ),
    ProfileKind.HEAD_ONLY: KindSpec(wire="head_only", uses_bank=False, fusion="none", min_version=1),
}

METHODS = tuple(kind.value for kind in KINDS)  # the profile kinds, by the method that trains each
WIRE_NAMES = {kind: spec.wire for kind, spec in KINDS.items()}
KINDS_BY_WIRE_NAME = {wire: kind for kind, wire in WIRE_NAMES.items()}


def applies_to() -> dict[str, tuple[str, ...]]:
    """Each kind-specific training field and the methods that read it."""
    out: dict[str, list[str]] = {}
    for kind, spec in KINDS.items():
        for name in spec.train_fields:
            out.setdefault(name, []).append(kind.value)
    return {name: tuple(methods) for name, methods in out.items()}
