"""What one training run does: the method and its hyper-parameters, importable without torch.

The CLI reads its flag defaults from here, so the command line, the Python API and the
evaluation share one set of defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.constants import (
    ABSTAIN_SCORES,
    CLASS_MEAN_SCORES,
    DEFAULT_ABSTAIN_RATE,
    ESTIMATORS,
    MAX_ABSTAIN_COST,
    MAX_GAIN,
)
from xpeft.profiles.kinds import METHODS, ProfileKind, applies_to

__all__ = [
    "ABSTAIN_FIELDS",
    "ABSTAIN_SCORES",
    "APPLIES_TO",
    "CLASS_MEAN_SCORES",
    "DEFAULT_ABSTAIN_RATE",
    "DEFAULT_ABSTAIN_SCORE",
    "ESTIMATORS",
    "HEAD_INITS",
    "MAX_ABSTAIN_COST",
    "MAX_GAIN",
    "METHODS",
    "SCORE_OPTIMIZERS",
    "TrainConfig",
]

# as far and near misses separate as the fp16 cosine, at 1 bit a class-mean entry (docs/ABSTENTION.md)
DEFAULT_ABSTAIN_SCORE = "blend"
HEAD_INITS = ("normal", "class_means")
SCORE_OPTIMIZERS = ("adam", "sgd")
MIN_HOLDOUT = 10  # fewer held-out examples than this calibrate no rule
# the TrainConfig fields of the abstention rule (the CLI and the training service take all of them)
ABSTAIN_FIELDS = ("abstain", "abstain_score", "holdout", "min_confidence", "oos_label", "fallback_label")
# fields that only some methods read: a value other than the default for another method is an error
APPLIES_TO = applies_to()


@dataclass
class TrainConfig:
    """Defaults are the ones measured in docs/EVALUATION.md (the variants table decided ``gain``);
    the reasons are in docs/METHOD.md."""

    method: str = "units"  # the shipped default: the best of the measured kinds (docs/EVALUATION.md)
    k: int | None = None  # adapters (hard) or units (units) kept per layer; default N // 10 or 4 * r
    epochs: int = 3
    lr_scores: float = 0.05  # mask scores move on a softmax scale: far above the head's rate
    lr_head: float = 5e-3
    lr_adapter: float = 1e-3  # single_adapter baseline
    batch_size: int = 32
    max_length: int = 128
    temperature: float = 1.0  # softmax temperature for soft masks and the STE's backward
    score_init_std: float = 0.01  # seeded random scores: the initial top-k is a random draw
    # how the mask scores step: "adam" (each score by its own gradient's running scale) or "sgd"
    # (each layer's gradient scaled to unit RMS, then an average over ~10 steps: a score moves in
    # proportion to its gradient, as in edge-popup)
    score_optimizer: str = "adam"
    seed: int = 0
    dropout: bool = True  # the frozen encoder's own dropout stays on while training
    eval_every: int = 0  # steps between dev evaluations for training curves (0: once per epoch)
    # hard masks: the method's open choices (docs/METHOD.md has the measurements)
    scale_power: float = 1.0  # a selected adapter weighs 1 / k**p (p = 1: the mean of the k)
    # straight-through surrogate: softmax, identity or gumbel (hard); softmax or identity (units);
    # default softmax (hard, the paper's) or identity (units, edge-popup's)
    estimator: str | None = None
    temperature_end: float | None = None  # anneal the temperature geometrically to this value
    # learn one positive gain per layer (L numbers in the profile): the best of the measured variants
    gain: bool = True
    gain_init: float | None = None  # default: the kind's (1 for hard, 0.1 for units)
    weighted: bool = False  # learn a weight for each selected adapter (2·L·k numbers)
    lr_gain: float = 0.05  # learning rate of the gains and weights
    # units: k bottleneck units per layer out of the bank's N*r (docs/METHOD.md)
    tied: bool = False  # one selection per unit for both projections, instead of one each
    out_scale: bool = False  # learn a per-layer output scaling vector (L*d numbers, int8 in the file)
    lr_out_scale: float = 0.01
    # the head's start: "normal" (small random weights) or "class_means" (each label's mean
    # embedding of the training rows, centred and scaled: one extra pass over the data)
    head_init: str = "normal"
    # abstention: a rule calibrated on a held-out part of the training data (docs/TRAINING.md)
    abstain: bool = True
    abstain_score: str = DEFAULT_ABSTAIN_SCORE
    holdout: float = 0.1  # fraction of each label's examples held out to calibrate the rule
    min_confidence: float | None = (
        None  # the operating point; default: conformal at DEFAULT_ABSTAIN_RATE, or OOS-picked
    )
    oos_label: str | None = None  # training rows with this label are OOS examples, not a class
    fallback_label: str | None = None  # answered instead of no label when a row abstains

    def validate(self) -> None:
        """Refuse settings that cannot train, or that the chosen method would silently ignore,
        before anything is loaded or written."""

        def bad(message: str) -> XPeftError:
            return XPeftError("bad_argument", message)

        if self.method not in METHODS:
            raise bad(f"unknown method {self.method!r}; one of {METHODS}")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise bad(f"estimator {self.estimator!r} is not one of {ESTIMATORS}")
        spec = ProfileKind(self.method).spec
        if self.estimator is not None and spec.estimators and self.estimator not in spec.estimators:
            takers = [kind.value for kind in ProfileKind if self.estimator in kind.spec.estimators]
            raise bad(
                f"estimator {self.estimator!r} applies to {', '.join(takers)} only; "
                f"{self.method} takes {' or '.join(spec.estimators)}"
            )
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.k is not None and self.k < 1:
            raise bad(f"k must be at least 1, got {self.k}")
        for name in ("lr_scores", "lr_head", "lr_adapter", "lr_gain", "lr_out_scale", "score_init_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise bad(f"{name} must be a finite number >= 0, got {value}")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise bad(f"{name} must be a finite number > 0, got {value}")
        if not 0.0 <= self.scale_power <= 4.0:
            raise bad(f"scale_power must lie in [0, 4], got {self.scale_power}")
        for name, choices in (("score_optimizer", SCORE_OPTIMIZERS), ("head_init", HEAD_INITS)):
            if getattr(self, name) not in choices:
                raise bad(f"{name} {getattr(self, name)!r} is not one of {choices}")
        if self.gain_init is not None and not 0.0 < self.gain_init <= MAX_GAIN:
            raise bad(f"gain_init must lie in (0, {MAX_GAIN:g}], got {self.gain_init}")
        self._validate_abstain(bad)
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for name, methods in APPLIES_TO.items():
            if self.method not in methods and getattr(self, name) != defaults[name]:
                names = " and ".join([", ".join(methods[:-1]), methods[-1]] if len(methods) > 1 else methods)
                raise bad(f"{name} applies to {names} only, not to method {self.method!r}")

    def _validate_abstain(self, bad: Callable[[str], XPeftError]) -> None:
        if self.abstain_score not in ABSTAIN_SCORES:
            raise bad(f"abstain_score {self.abstain_score!r} is not one of {ABSTAIN_SCORES}")
        if not (isinstance(self.holdout, int | float) and 0.0 < self.holdout <= 0.5):
            raise bad(f"holdout must lie in (0, 0.5], got {self.holdout}")
        mc = self.min_confidence
        if mc is not None and (
            isinstance(mc, bool)
            or not isinstance(mc, int | float)
            or not (math.isfinite(mc) and 0 <= mc <= 1)
        ):
            raise bad(f"min_confidence must lie in [0, 1], got {mc}")
        if self.oos_label is not None and self.oos_label == self.fallback_label:
            raise bad(f"the OOS label {self.oos_label!r} cannot also be the fallback label")
        if not self.abstain and (mc is not None or self.fallback_label is not None or self.oos_label):
            raise bad("min_confidence, oos_label and fallback_label need abstention on (abstain=True)")

    def resolved_estimator(self) -> str:
        """The straight-through surrogate: the kind's default (the paper's softmax for hard masks,
        the identity for units) unless one is given."""
        if self.estimator is not None:
            return self.estimator
        return ProfileKind(self.method).spec.default_estimator

    def resolved_gain_init(self) -> float:
        """The gains' starting value: the kind's default (a units adapter starts at a fraction of
        one bank adapter's strength, docs/METHOD.md) unless one is given."""
        if self.gain_init is not None:
            return self.gain_init
        return ProfileKind(self.method).spec.default_gain_init

    def check_bank(self, num_adapters: int, bottleneck: int) -> None:
        """Refuse a ``k`` the bank cannot give: at most N adapters (hard), N*r units (units)."""
        spec = ProfileKind(self.method).spec
        if not spec.selects:
            return
        k = self.resolved_k(num_adapters, bottleneck)
        pool, what = spec.selection_pool(num_adapters, bottleneck)
        if not 1 <= k <= pool:
            raise XPeftError("bad_argument", f"k={k} must be between 1 and {what}={pool}")

    def resolved_k(self, num_adapters: int, bottleneck: int = 1) -> int:
        """k as given, else the kind's default: N // 10 adapters (hard), 4 * r units (units)."""
        if self.k is not None:
            return self.k
        return ProfileKind(self.method).spec.default_k(num_adapters, bottleneck)
