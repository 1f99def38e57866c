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

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.profile import Profile, ProfileKind
from xpeft.training.abstain_fit import Split, calibration_note, check_training_data, fit_rule
from xpeft.training.data import DataError, Dataset
from xpeft.training.diagnostics import adapter_ratio, mask_overlap
from xpeft.training.train_config import METHODS, TrainConfig
from xpeft.training.trainable import Trainable

__all__ = ["METHODS", "TrainConfig", "TrainResult", "train_profile"]


@dataclass
class TrainResult:
    profile: Profile
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    split: Split | None = None  # the cut that calibrated the profile's abstention rule, if it has one
    notes: list[str] = field(default_factory=list)  # what a user should know (say, no rule was fitted)


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
    on_step: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one profile on ``train``; with ``eval_data``, record dev accuracy for training curves.

    ``on_step`` sees each step's record (``step``, ``total``, ``loss``, ``train_accuracy``); an
    exception it raises stops training there (a training service cancels a job this way).
    """
    config = config or TrainConfig()
    config.validate()
    if len(train) == 0:
        raise DataError("bad_data", "the training data is empty")
    split, notes, train = check_training_data(train, config)
    labels = train.label_names()
    y_train = _label_index(train, labels)
    y_eval = _label_index(eval_data, labels) if eval_data is not None else None

    torch.manual_seed(config.seed)
    order_rng = torch.Generator().manual_seed(config.seed)
    device = encoder.device
    work_bank = bank.to(device, torch.float32)
    trainable = Trainable(config.method, work_bank, len(labels), config).to(device)
    if config.head_init == "class_means":
        _head_from_class_means(encoder, trainable, train, y_train, config)
    optimizers = _optimizers(trainable, config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedulers = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: max(0.0, 1.0 - s / max(total, 1))) for o in optimizers
    ]
    eval_every = config.eval_every or steps_per_epoch
    frozen_features = trainable.frozen_features
    probe = encoder.tokenize(train.inputs[: config.batch_size], config.max_length)
    trainable.eval()
    diagnostics: dict = {"adapter_ratio_start": adapter_ratio(encoder, trainable.fused(), probe)}
    spec = ProfileKind(config.method).spec
    start_masks = trainable.masks() if spec.selects else None
    grad_norms: list[float] = []

    history: list[dict] = []
    start = time.perf_counter()
    step = 0
    # disable=None: a bar on a terminal only, never carriage returns in a log file
    bar = tqdm(total=total, desc=f"train {config.method}", disable=None if progress else True, unit="step")
    seen = correct = 0
    try:
        for _epoch in range(config.epochs):
            order = torch.randperm(len(train), generator=order_rng).tolist()
            for b in range(0, len(order), config.batch_size):
                index = order[b : b + config.batch_size]
                encoder.train(config.dropout)
                trainable.train()
                trainable.temperature = _temperature(config, step, total)
                enc = encoder.tokenize([train.inputs[i] for i in index], config.max_length)
                target = y_train[index].to(device)
                if frozen_features:
                    with torch.no_grad():
                        pooled = encoder(enc)
                else:
                    pooled = encoder(enc, trainable.fused())
                logits = trainable.head(pooled.float())
                loss = nn.functional.cross_entropy(logits, target)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if "lr_scores" in spec.train_fields:  # a method that trains mask scores
                    grad_norms.append(_score_grad_norm(trainable))
                for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                    optimizer.step()
                    scheduler.step()
                step += 1
                seen += len(index)
                correct += int((logits.argmax(-1) == target).sum())
                record = {"step": step, "loss": loss.item(), "train_accuracy": correct / seen}
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
                bar.update(1)
                if y_eval is not None and eval_data is not None and (step % eval_every == 0 or step == total):
                    record["eval_accuracy"] = _accuracy(encoder, trainable, eval_data, y_eval, config)
                    if on_eval:
                        on_eval(record)
                history.append(record)
                if on_step:
                    on_step({**record, "total": total})
    finally:
        bar.close()
        encoder.eval()
        trainable.eval()
    seconds = time.perf_counter() - start
    diagnostics.update(_end_diagnostics(encoder, trainable, probe, grad_norms, start_masks))
    meta = {"method": config.method, "seed": str(config.seed)}
    profile = trainable.to_profile(bank, labels, config.max_length, meta)
    if split is not None:
        model = MultiProfileModel(encoder, bank)
        profile.abstain = fit_rule(
            model, profile, split, config.abstain_score, config.min_confidence, config.fallback_label
        )
        note = calibration_note(profile.abstain, config)
        notes += [note] if note else []
    return TrainResult(
        profile=profile,
        history=history,
        seconds=seconds,
        config=asdict(config),
        diagnostics=diagnostics,
        split=split,
        notes=notes,
    )


def _optimizers(trainable: Trainable, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for every parameter; with ``score_optimizer="sgd"`` the mask scores step apart.

    Adam moves every score by about its rate whatever its gradient's size, so a unit whose gradient
    is small but steady climbs as fast as one that matters. The SGD path scales each layer's score
    gradient to unit RMS (the rate keeps Adam's meaning on average) and averages it over about 10
    steps (momentum 0.9, dampening 0.9): a score then moves in proportion to its gradient.
    """
    groups = trainable.param_groups()
    if config.score_optimizer == "adam":
        return [torch.optim.AdamW(groups, weight_decay=0.01)]
    scores = trainable.score_tensors()
    ids = {id(t) for t in scores}
    for t in scores:
        t.register_hook(_unit_rms_rows)
    rest = [g for g in groups if not any(id(p) in ids for p in g["params"])]
    by_scores = [g for g in groups if any(id(p) in ids for p in g["params"])]
    return [
        torch.optim.AdamW(rest, weight_decay=0.01),
        torch.optim.SGD(by_scores, lr=config.lr_scores, momentum=0.9, dampening=0.9),
    ]


def _unit_rms_rows(grad: torch.Tensor) -> torch.Tensor:
    """Each layer's (row's) score gradient at unit root-mean-square."""
    return grad / grad.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-20)


def _temperature(config: TrainConfig, step: int, total: int) -> float:
    """The constant temperature, or a geometric schedule to ``temperature_end``."""
    if config.temperature_end is None or total <= 1:
        return config.temperature
    ratio = config.temperature_end / config.temperature
    return config.temperature * ratio ** (step / (total - 1))


def _score_grad_norm(trainable: Trainable) -> float:
    grads = [p.grad.float() for p in trainable.score_tensors() if p.grad is not None]
    return float(torch.cat([g.flatten() for g in grads]).norm()) if grads else 0.0


def _end_diagnostics(
    encoder: AdapterEncoder,
    trainable: Trainable,
    probe: dict,
    grads: list[float],
    start_masks: tuple[torch.Tensor, torch.Tensor] | None,
) -> dict:
    out: dict = {"adapter_ratio_end": adapter_ratio(encoder, trainable.fused(), probe)}
    if grads:
        tenth = max(1, len(grads) // 10)
        out["score_grad_norm_first"] = sum(grads[:tenth]) / tenth
        out["score_grad_norm_last"] = sum(grads[-tenth:]) / tenth
    if start_masks is not None:
        end = trainable.masks()
        out["mask_overlap_down"] = mask_overlap(start_masks[0], end[0])
        out["mask_overlap_up"] = mask_overlap(start_masks[1], end[1])
    gains = trainable.gains()
    if gains is not None:
        out["gains"] = [round(float(g), 4) for g in gains.detach().cpu()]
    return out


@torch.no_grad()
def _head_from_class_means(
    encoder: AdapterEncoder, trainable: Trainable, data: Dataset, y: torch.Tensor, config: TrainConfig
) -> None:
    """Start the head as a nearest-class-mean classifier on the starting features: label c's row is
    its rows' mean embedding minus the mean of all rows, its bias puts that overall mean at 0, and
    one scale gives the training rows' logits unit spread. A few epochs on small data then refine a
    head that already separates the labels, instead of first finding them."""
    pooled = _pooled(encoder, trainable, data, config).float().cpu()
    num_labels = trainable.head.out_features
    counts = torch.bincount(y, minlength=num_labels).clamp_min(1).unsqueeze(1)
    means = torch.zeros(num_labels, pooled.shape[1]).index_add_(0, y, pooled) / counts
    center = pooled.mean(0)
    weight = means - center
    spread = ((pooled - center) @ weight.T).std()
    scale = 1.0 / float(spread) if float(spread) > 0 else 1.0
    head = trainable.head
    head.weight.copy_((weight * scale).to(head.weight))
    head.bias.copy_((-(weight @ center) * scale).to(head.bias))


@torch.no_grad()
def _pooled(
    encoder: AdapterEncoder, trainable: Trainable, data: Dataset, config: TrainConfig, batch_size: int = 128
) -> torch.Tensor:
    """The pooled embeddings of ``data`` under the parameters as they are now (eval mode)."""
    encoder.eval()
    trainable.eval()
    fused = trainable.fused()
    parts = []
    for b in range(0, len(data), batch_size):
        enc = encoder.tokenize(data.inputs[b : b + batch_size], config.max_length)
        parts.append(encoder(enc, fused))
    return torch.cat(parts)


@torch.no_grad()
def _accuracy(
    encoder: AdapterEncoder, trainable: Trainable, data: Dataset, y: torch.Tensor, config: TrainConfig
) -> float:
    """Dev accuracy of the parameters as they are now (hard masks already exactly k-hot)."""
    pred = trainable.head(_pooled(encoder, trainable, data, config).float()).argmax(-1).cpu()
    return int((pred == y).sum()) / len(data)
