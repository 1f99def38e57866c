"""The profile kinds, one row each: the table every other module reads instead of naming kinds.

A kind says what a profile stores and how it becomes an adapter. Each lives in a module of its
own here (``hard``, ``units``, ``soft``, ``single_adapter``, ``head_only``): its header fields,
its ``.xpm`` sections and their decode checks, the state a decoded profile holds, the fusion the
runtime gives it, its trainable parameters and the training settings only it reads, and a random
instance for tests and benchmarks; :mod:`xpeft.profiles.kinds.base` is the interface they share.
A new kind on an existing fusion is its module, its row below, and docs/METHOD.md.
"""

from __future__ import annotations

from enum import Enum

from xpeft.profiles.kinds.base import HeaderField, Kind, KindState, Shape
from xpeft.profiles.kinds.hard import Hard
from xpeft.profiles.kinds.head_only import HeadOnly
from xpeft.profiles.kinds.single_adapter import SingleAdapter
from xpeft.profiles.kinds.soft import Soft
from xpeft.profiles.kinds.units import Units

__all__ = [
    "HEADER_FIELDS",
    "KINDS",
    "KINDS_BY_WIRE_NAME",
    "METHODS",
    "WIRE_NAMES",
    "Kind",
    "KindState",
    "ProfileKind",
    "Shape",
    "applies_to",
]


class ProfileKind(str, Enum):
    HARD = "hard"  # two bit-packed k-hot masks over the bank's adapters
    UNITS = "units"  # k bottleneck units per layer picked from the bank's N*r, as bits or indices
    SOFT = "soft"  # two fp16 softmax weight tensors over the bank's adapters
    SINGLE_ADAPTER = "single_adapter"  # baseline: one whole adapter of its own, fp16
    HEAD_ONLY = "head_only"  # baseline: no adapter at all

    @property
    def spec(self) -> Kind:
        """The kind's behaviour: its row in :data:`KINDS`."""
        return KINDS[self]

    @property
    def uses_bank(self) -> bool:
        return KINDS[self].uses_bank


KINDS: dict[ProfileKind, Kind] = {
    ProfileKind.HARD: Hard(),
    ProfileKind.UNITS: Units(),
    ProfileKind.SOFT: Soft(),
    ProfileKind.SINGLE_ADAPTER: SingleAdapter(),
    ProfileKind.HEAD_ONLY: HeadOnly(),
}

METHODS = tuple(kind.value for kind in KINDS)  # the profile kinds, by the method that trains each
WIRE_NAMES = {kind: spec.wire for kind, spec in KINDS.items()}
KINDS_BY_WIRE_NAME = {wire: kind for kind, wire in WIRE_NAMES.items()}
# every kind's optional header fields, each once, in table order (ProfileInfo shows them all)
HEADER_FIELDS: dict[str, HeaderField] = {f.name: f for spec in KINDS.values() for f in spec.header_fields}


def applies_to() -> dict[str, tuple[str, ...]]:
    """Each kind-specific training field and the methods that read it."""
    out: dict[str, list[str]] = {}
    for kind, spec in KINDS.items():
        for name in spec.train_fields:
            out.setdefault(name, []).append(kind.value)
    return {name: tuple(methods) for name, methods in out.items()}
