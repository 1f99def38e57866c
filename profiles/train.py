"""Training a profile: X-PEFT soft or hard masks, and the paper's two baselines.

Only the profile's own parameters train: the mask scores and the head (``hard``, ``soft``),
one adapter and the head (``single_adapter``), or the head alone (``head_only``). The encoder and
the bank never change. Training runs the same encoder and fusion code as serving, with U=1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.errors import XPeftError
from xpeft.adapters.fusion import FusedAdapters, fuse
from xpeft.profiles.data import DataError, Dataset
from xpeft.profiles.masks import hard_weights, khot, soft_weights
from xpeft.profiles.profile import Profile, ProfileKind

METHODS = ("hard", "soft", "single_adapter", "head_only")


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

    def resolved_k(self, num_adapters: int) -> int:
        return self.k if self.k is not None else max(1, num_adapters // 10)


@dataclass
class TrainResult:
    profile: Profile
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


class _Trainable(nn.Module):
    """The parameters one method trains, and how they become fused adapters."""

    def __init__(self, method: str, bank: AdapterBank, num_labels: int, config: TrainConfig) -> None:
        super().__init__()
        L, N, d, r = bank.down.shape
        self.method, self.bank, self.config = method, bank, config
        self.k = config.resolved_k(N) if method == "hard" else 0
        if method == "hard" and not 1 <= self.k <= N:
            raise XPeftError("bad_argument", f"k={self.k} must be between 1 and N={N}")
        self.head = nn.Linear(d, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if method in ("hard", "soft"):
            self.scores_down = nn.Parameter(torch.randn(L, N) * config.score_init_std)
            self.scores_up = nn.Parameter(torch.randn(L, N) * config.score_init_std)
        elif method == "single_adapter":
            # Identity at the start (up = 0), the usual adapter initialisation.
            self.down = nn.Parameter(torch.randn(L, d, r) * 0.02)
            self.down_bias = nn.Parameter(torch.zeros(L, r))
            self.up = nn.Parameter(torch.zeros(L, r, d))
            self.up_bias = nn.Parameter(torch.zeros(L, d))
        elif method != "head_only":
            raise XPeftError("bad_argument", f"unknown method {method!r}; one of {METHODS}")

    def param_groups(self) -> list[dict]:
        c = self.config
        groups = [{"params": list(self.head.parameters()), "lr": c.lr_head}]
        if self.method in ("hard", "soft"):
            groups.append(
                {"params": [self.scores_down, self.scores_up], "lr": c.lr_scores, "weight_decay": 0.0}
            )
        elif self.method == "single_adapter":
            groups.append({"params": [self.down, self.down_bias, self.up, self.up_bias], "lr": c.lr_adapter})
        return groups

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.temperature
        if self.method == "hard":
            return hard_weights(self.scores_down, self.k, t), hard_weights(self.scores_up, self.k, t)
        return soft_weights(self.scores_down, t), soft_weights(self.scores_up, t)

    def fused(self) -> FusedAdapters | None:
        if self.method in ("hard", "soft"):
            w_down, w_up = self.weights()
            return fuse(w_down.unsqueeze(0), w_up.unsqueeze(0), self.bank)
        if self.method == "single_adapter":
            return FusedAdapters.from_single({n: getattr(self, n) for n in TENSOR_NAMES})
        return None

    def to_profile(
        self, bank: AdapterBank, labels: list[str], max_length: int, meta: dict[str, str]
    ) -> Profile:
        L, N, d, r = bank.down.shape
        common = dict(
            bank_id=bank.bank_id,
            model_id=bank.model_id,
            num_layers=L,
            num_adapters=N,
            hidden_size=d,
            bottleneck=r,
            labels=labels,
            max_length=max_length,
            meta=meta,
            head_weight=self.head.weight.detach().cpu().float().clone(),
            head_bias=self.head.bias.detach().cpu().float().clone(),
        )
        if self.method == "hard":
            return Profile(
                kind=ProfileKind.HARD,
                k=self.k,
                mask_down=khot(self.scores_down.detach().cpu(), self.k),
                mask_up=khot(self.scores_up.detach().cpu(), self.k),
                **common,
            )
        if self.method == "soft":
            w_down, w_up = (w.detach().cpu().float() for w in self.weights())
            return Profile(kind=ProfileKind.SOFT, weights_down=w_down, weights_up=w_up, **common)
        if self.method == "single_adapter":
            adapter = {n: getattr(self, n).detach().cpu().float().clone() for n in TENSOR_NAMES}
            return Profile(kind=ProfileKind.ADAPTER, adapter=adapter, **common)
        return Profile(kind=ProfileKind.HEAD_ONLY, **common)


def _label_index(data: Dataset, labels: list[str]) -> torch.Tensor:
    position = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(data.labels) - set(position))
    if unknown:
        raise DataError("bad_data", f"labels {unknown[:5]} do not occur in the training data {labels}")
    return torch.tensor([position[y] for y in data.labels])


def train_profile(
    encoder: AdapterEncoder,
    bank: AdapterBank,
    train: Dataset,
    config: TrainConfig | None = None,
    eval_data: Dataset | None = None,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one profile on ``train``; with ``eval_data``, record dev accuracy for training curves."""
    config = config or TrainConfig()
    if len(train) == 0:
        raise DataError("bad_data", "the training data is empty")
    labels = train.label_names()
    if len(labels) < 2:
        raise DataError("bad_data", f"training needs at least 2 labels, found {labels}")
    y_train = _label_index(train, labels)
    y_eval = _label_index(eval_data, labels) if eval_data is not None else None

    torch.manual_seed(config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)
    device = encoder.device
    work_bank = bank.to(device, torch.float32)
    trainable = _Trainable(config.method, work_bank, len(labels), config).to(device)
    optimizer = torch.optim.AdamW(trainable.param_groups(), weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(total, 1)))
    eval_every = config.eval_every or steps_per_epoch
    frozen_features = config.method == "head_only"

    history: list[dict] = []
    start = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc=f"train {config.method}", disable=not progress, unit="step")
    seen = correct = 0
    try:
        for _epoch in range(config.epochs):
            order = torch.randperm(len(train), generator=order_rng).tolist()
            for b in range(0, len(order), config.batch_size):
                index = order[b : b + config.batch_size]
                encoder.train(config.dropout)
                enc = encoder.tokenize([train.inputs[i] for i in index], config.max_length)
                target = y_train[index].to(device)
                if frozen_features:
                    with torch.no_grad():
                        pooled = encoder(enc)
                else:
                    pooled = encoder(enc, trainable.fused())
                logits = trainable.head(pooled.float())
                loss = nn.functional.cross_entropy(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                seen += len(index)
                correct += int((logits.argmax(-1) == target).sum())
                record = {"step": step, "loss": loss.item(), "train_accuracy": correct / seen}
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
                bar.update(1)
                if eval_data is not None and (step % eval_every == 0 or step == total):
                    record["eval_accuracy"] = _accuracy(encoder, trainable, eval_data, y_eval, config)
                    if on_eval:
                        on_eval(record)
                history.append(record)
    finally:
        bar.close()
        encoder.eval()
    seconds = time.perf_counter() - start
    meta = {"method": config.method, "seed": str(config.seed)}
    profile = trainable.to_profile(bank, labels, config.max_length, meta)
    return TrainResult(profile=profile, history=history, seconds=seconds, config=asdict(config))


@torch.no_grad()
def _accuracy(
    encoder: AdapterEncoder,
    trainable: _Trainable,
    data: Dataset,
    y: torch.Tensor,
    config: TrainConfig,
    batch_size: int = 128,
) -> float:
    """Dev accuracy of the parameters as they are now (hard masks already exactly k-hot)."""
    encoder.eval()
    fused = trainable.fused()
    correct = 0
    for b in range(0, len(data), batch_size):
        enc = encoder.tokenize(data.inputs[b : b + batch_size], config.max_length)
        pooled = encoder(enc, fused)
        pred = trainable.head(pooled.float()).argmax(-1).cpu()
        correct += int((pred == y[b : b + batch_size]).sum())
    return correct / len(data)
