"""What one training run does: the method and its hyper-parameters, importable without torch.

The CLI reads its flag defaults from here, so the command line, the Python API and the
evaluation share one set of defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("hard", "soft", "single_adapter", "head_only")  # the profile kinds, by the method that trains each
ESTIMATORS = ("softmax", "identity", "gumbel")


@dataclass
class TrainConfig:
    """Defaults are the ones measured in docs/EVALUATION.md; the reasons are in docs/METHOD.md."""

    method: str = "hard"
    k: int | None = None  # hard masks: adapters kept per layer; default N // 10
    epochs: int = 3
    lr_scores: float = 0.05  # mask scores move on a softmax scale: far above the head's rate
    lr_head: float = 5e-3
    lr_adapter: float = 1e-3  # single_adapter baseline
    batch_size: int = 32
    max_length: int = 128
    temperature: float = 1.0  # softmax temperature for soft masks and the STE's backward
    score_init_std: float = 0.01  # seeded random scores: the initial top-k is a random draw
    seed: int = 0
    dropout: bool = True  # the frozen encoder's own dropout stays on while training
    eval_every: int = 0  # steps between dev evaluations for training curves (0: once per epoch)
    # hard masks: the method's open choices (docs/METHOD.md has the measurements)
    scale_power: float = 1.0  # a selected adapter weighs 1 / k**p (p = 1: the mean of the k)
    estimator: str = "softmax"  # straight-through surrogate: softmax, identity or gumbel
    temperature_end: float | None = None  # anneal the temperature geometrically to this value
    gain: bool = False  # learn one positive gain per layer (L numbers in the profile)
    gain_init: float = 1.0
    weighted: bool = False  # learn a weight for each selected adapter (2·L·k numbers)
    lr_gain: float = 0.05  # learning rate of the gains and weights

    def resolved_k(self, num_adapters: int) -> int:
        return self.k if self.k is not None else max(1, num_adapters // 10)
