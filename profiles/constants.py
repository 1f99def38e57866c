"""The fixed names and bounds a profile file and its abstention rule are checked against.

They live here, below the training package, because the format, the masks and the rule read
them at serving time; :mod:`xpeft.training.train_config` re-exports them for the training
settings. Importable without torch.
"""

from __future__ import annotations

__all__ = [
    "ABSTAIN_SCORES",
    "CLASS_MEAN_SCORES",
    "DEFAULT_ABSTAIN_RATE",
    "SIGN_SCORES",
    "ESTIMATORS",
    "MAX_ABSTAIN_COST",
    "MAX_GAIN",
]

ESTIMATORS = ("softmax", "identity", "gumbel")  # the straight-through surrogates of a selection
MAX_GAIN = 1024.0  # the largest gain a profile file may hold
# abstention (docs/TRAINING.md): the scores a rule may read; those that need the class means
ABSTAIN_SCORES = ("msp", "max_logit", "energy", "cosine", "blend")
# the scores that read per-class vectors: cosine stores fp16 class means, blend their signs (1 bit each)
CLASS_MEAN_SCORES = ("cosine", "blend")
SIGN_SCORES = ("blend",)
# the default operating point: a new in-scope row abstains with probability at most this (conformal;
# docs/ABSTENTION.md has the rates it gives on every task's test split)
DEFAULT_ABSTAIN_RATE = 0.01
MAX_ABSTAIN_COST = 0.02  # with OOS examples: held-out in-scope accuracy the chosen point may give up
