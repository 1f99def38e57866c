"""What every profile kind provides: the interface the format, the runtime and training call.

The kinds are imported without torch (the command's flags and ``TrainConfig`` read the table),
so their modules import torch and the tensor code inside the methods that use them.

A kind is one object in the kinds table (:mod:`xpeft.profiles.kinds`): its name on the wire,
the header fields and payload sections of its ``.xpm`` files, the state a decoded profile of it
holds, the fusion the runtime gives it, and the parameters its training owns. Everything else
reads these attributes and methods instead of naming kinds; the defaults here are those of a
kind that stores nothing besides the head (``head_only``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

from xpeft.profiles.constants import MAX_GAIN
from xpeft.profiles.format_errors import ProfileFormatError

if TYPE_CHECKING:  # the table is read without torch (the CLI's flags, TrainConfig): torch loads on use
    import torch

    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.fusion import FusedAdapters
    from xpeft.profiles.format_codecs import Section

__all__ = [
    "FUSIONS",
    "SCORE_FIELDS",
    "SELECT_FIELDS",
    "HeaderField",
    "Kind",
    "KindParams",
    "KindState",
    "Shape",
    "TrainSettings",
    "checked_gains",
]

# How the runtime fuses a kind into the slot pool (it dispatches on these, never on kind names):
# "gather": weights over k selected bank adapters, grouped by k (or joined to "mix" where the GEMM
# over the whole bank is faster); "mix": mixing weights over every adapter, one GEMM; "units": a
# gather of k bank units per layer, grouped by k; "own": an adapter of its own, copied in; "none":
# an all-zero adapter.
FUSIONS = ("gather", "mix", "units", "own", "none")
# TrainConfig fields read by every kind that trains scores, and by every kind that selects k
SCORE_FIELDS = ("lr_scores", "temperature", "temperature_end", "score_init_std", "score_optimizer")
SELECT_FIELDS = ("k", "estimator", "gain_init", "lr_gain")


class Shape(NamedTuple):
    """A profile's sizes, as its header gives them: layers, adapters, hidden size, bottleneck,
    labels and the kind's ``k``."""

    L: int
    N: int
    d: int
    r: int
    C: int
    k: int


@dataclass(frozen=True)
class HeaderField:
    """One optional ``.xpm`` header field of a kind (format version 2 and later): declared here
    once; the header check, :class:`~xpeft.profiles.format_header.ProfileInfo` and the metadata
    the server and ``xpeft info`` show derive from it."""

    name: str
    default: bool | float
    low: float = 0.0  # a number's bounds (booleans have none)
    high: float = 0.0

    def read(self, value: object) -> bool | float:
        """A checked header value as the header's readers see it (a number as a float)."""
        return bool(value) if isinstance(self.default, bool) else float(value)  # type: ignore[arg-type]

    def check(self, value: object) -> None:
        """Refuse a value of the wrong JSON type or out of bounds (``bad_header``)."""
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ProfileFormatError("bad_header", f"{self.name} must be a JSON boolean")
        elif (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not self.low <= value <= self.high
        ):
            raise ProfileFormatError(
                "bad_header", f"{self.name}={value!r} is not a number in [{self.low:g}, {self.high:g}]"
            )


@dataclass(eq=False)
class KindState:
    """What a decoded profile of one kind holds besides its head: the kind's own dataclass."""

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it holds (what a host cache budgets for)."""
        import torch

        out: list[torch.Tensor] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, dict):
                out.extend(v for v in value.values() if isinstance(v, torch.Tensor))
        return out


class TrainSettings(Protocol):
    """The training settings a kind's parameters read (``xpeft.training.train_config.TrainConfig``
    provides them; the kinds sit below training and name only this)."""

    @property
    def score_init_std(self) -> float: ...
    @property
    def scale_power(self) -> float: ...
    @property
    def gain(self) -> bool: ...
    @property
    def weighted(self) -> bool: ...
    @property
    def tied(self) -> bool: ...
    @property
    def out_scale(self) -> bool: ...
    @property
    def seed(self) -> int: ...
    @property
    def lr_scores(self) -> float: ...
    @property
    def lr_adapter(self) -> float: ...
    @property
    def lr_gain(self) -> float: ...
    @property
    def lr_out_scale(self) -> float: ...
    def resolved_estimator(self) -> str: ...
    def resolved_gain_init(self) -> float: ...


class KindParams:
    """One profile's trainable parameters besides its head (none here: ``head_only``).

    A plain object, so that the kinds import without torch: training's ``Trainable`` module
    registers :meth:`named_parameters` as its own, and moves them with itself.
    """

    def named_parameters(self) -> list[tuple[str, Any]]:
        """Its ``nn.Parameter`` attributes, by name (a tied one under each of its names)."""
        from torch import nn

        return [(name, p) for name, p in vars(self).items() if isinstance(p, nn.Parameter)]

    def param_groups(self) -> list[dict]:
        """The optimizer's groups of these parameters, each with its learning rate."""
        return []

    def score_tensors(self) -> list[torch.Tensor]:
        """The selection scores whose gradient norm training records (one tensor when tied)."""
        return []

    def masks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current selection, for kinds that select (``Kind.selects``)."""
        return None

    def gains(self) -> torch.Tensor | None:
        return None

    def fused(self, temperature: float, training: bool) -> FusedAdapters | None:
        """The adapter these parameters make now (``None``: the encoder runs without one);
        ``training``: in a training step (a stochastic estimator draws its noise then)."""
        return None

    def to_state(self, shape: Shape, temperature: float) -> KindState | None:
        """What the profile file keeps of them (bits for a selection, not the scores)."""
        return None


def checked_gains(tensors: Mapping[str, torch.Tensor], name: str = "gains") -> torch.Tensor:
    """A decoded gain section: every value in ``(0, MAX_GAIN]``, else ``bad_payload``."""
    gains = tensors[name]
    if not bool(((gains > 0) & (gains <= MAX_GAIN)).all()):
        raise ProfileFormatError("bad_payload", f"{name} must lie in (0, {MAX_GAIN:g}]")
    return gains


class Kind:
    """One profile kind's behaviour. Subclasses set the attributes and override what they store."""

    wire: ClassVar[str]  # the kind's name in .xpm headers
    uses_bank: ClassVar[bool] = False  # a profile of this kind is refused by any other bank
    fusion: ClassVar[str] = "none"  # one of FUSIONS
    min_version: ClassVar[int] = 1  # the oldest .xpm format version that can hold it
    header_fields: ClassVar[tuple[HeaderField, ...]] = ()  # optional, each needing version 2+
    train_fields: ClassVar[tuple[str, ...]] = ()  # TrainConfig fields that this kind's training reads
    selects: ClassVar[bool] = False  # training picks k of a pool; the overlap with its start is reported
    estimators: ClassVar[tuple[str, ...]] = ()  # the straight-through estimators its selection takes
    default_estimator: ClassVar[str] = "softmax"
    default_gain_init: ClassVar[float] = 1.0
    state_type: ClassVar[type[KindState] | None] = None  # the dataclass a decoded profile holds
    # the shapes besides (L, d) a profile must share with the bank it is served with
    bank_shapes: ClassVar[tuple[str, ...]] = ()

    # -- the header ----------------------------------------------------------------------------
    def k_bounds(self, N: int, r: int) -> tuple[int, int]:
        """The values a header's ``k`` may take."""
        return 0, N

    def header_options(self, state: KindState | None) -> dict:
        """The optional header fields a profile of this kind is written with."""
        return {}

    # -- the payload ---------------------------------------------------------------------------
    def sections(self, shape: Shape, options: Mapping[str, object]) -> list[Section]:
        """What a profile of this kind stores before its head, in file order."""
        return []

    def stored(self, state: KindState | None, section: Section, shape: Shape) -> torch.Tensor | None:
        """The tensor ``section`` stores, as the state holds it (``None``: missing)."""
        return getattr(state, section.name, None)

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: Shape, options: Mapping[str, object]
    ) -> KindState | None:
        """The state the decoded sections make; any inconsistency is ``bad_payload``."""
        return None

    # -- serving ---------------------------------------------------------------------------------
    def mixing_weights(self, state: KindState | None, shape: Shape) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_down, w_up)``, each ``(L, N)`` fp32, for kinds that fuse as weights over the bank."""
        raise ValueError(f"a {self.wire} profile has no mixing weights")

    def own_adapter(self, state: KindState | None) -> dict[str, torch.Tensor]:
        """The adapter a profile of the ``own`` fusion brings, by bank tensor name."""
        raise ValueError(f"a {self.wire} profile has no adapter of its own")

    # -- training --------------------------------------------------------------------------------
    def selection_pool(self, N: int, r: int) -> tuple[int, str]:
        """How many things a selection picks from, and what to call them in an error."""
        return N, "N"

    def default_k(self, N: int, r: int) -> int:
        return max(1, N // 10)

    def trainable(self, bank: AdapterBank, config: TrainSettings, k: int) -> KindParams:
        """Fresh parameters for one profile, on ``bank``'s device."""
        return KindParams()

    # -- synthetic profiles --------------------------------------------------------------------
    def random(
        self, generator: torch.Generator, shape: Shape, **options: object
    ) -> tuple[int, KindState | None]:
        """A seeded random valid ``(k, state)`` (``shape.k`` 0: the kind's default)."""
        if options:
            raise TypeError(f"a {self.wire} profile takes no options, got {sorted(options)}")
        return 0, None
