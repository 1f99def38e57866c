"""The evaluation suite: the paper's comparison as a resumable, deadline-aware grid, and its report.

    python -m xpeft.profiles.suite run --config bench/eval/gpu.json --out results.jsonl
    python -m xpeft.profiles.suite report --results results.jsonl --out docs/EVALUATION.md
    python -m xpeft.profiles.suite pack-model --out .carry/minilm

``run`` appends one JSON line per finished run (written whole, flushed and fsynced), so a killed
grid resumes where it stopped: runs whose key is already in the file are skipped. The grid runs
in priority order (hyper-parameter search on a held-out train slice, then the main table seed by
seed, then the N / k sweeps) and ``--deadline-seconds`` stops it before a run that would not finish.
``report`` renders ``docs/EVALUATION.md`` and its plots from the JSONL alone (xpeft.profiles.suite_report).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xpeft.adapters.bank import TENSOR_NAMES, AdapterBank, create_random_bank, stack_adapters
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.adapters.errors import XPeftError
from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles import format as xpm
from xpeft.profiles.data import Dataset, load_dataset
from xpeft.profiles.evaluate import evaluate
from xpeft.profiles.profile import Profile, ProfileKind
from xpeft.profiles.runtime import MultiProfileModel
from xpeft.profiles.train import METHODS, TrainConfig, train_profile

SUITE_FORMAT = 1
log = logging.getLogger("xpeft.suite")


class SuiteError(XPeftError):
    """A bad suite config or results file."""


class DeadlineReached(Exception):
    """Raised when the next unit of work would not finish before the deadline."""


# -- configuration -----------------------------------------------------------------------------
def _from_dict(cls, data: dict, where: str):
    """Build a dataclass from a dict, refusing unknown keys (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SuiteError("bad_config", f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise SuiteError("bad_config", f"{where}: {exc}") from exc


@dataclass(frozen=True)
class TaskConfig:
    """One labelled task: file paths relative to the data root, columns, sizes and training length."""

    train: str
    dev: str
    text_col: str = "sentence"
    text_pair_col: str | None = None
    label_col: str = "label"
    train_size: int | None = None  # a fixed seeded subset of the train file; None: all of it
    dev_size: int | None = None  # None: the whole dev file (a subset only for smoke configs)
    subset_seed: int = 0
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 32
    curve_every: int = 0  # seed-0 soft/hard random-bank runs: dev accuracy every this many steps
    curve_dev_size: int | None = None  # dev subset for those curve points (final accuracy: whole dev)
    title: str = ""


@dataclass(frozen=True)
class TrainDefaults:
    """Hyper-parameters shared by all runs unless the search picks another value."""

    lr_scores: float = 0.05
    lr_head: float = 5e-3
    lr_adapter: float = 1e-3
    temperature: float = 1.0
    score_init_std: float = 0.01
    dropout: bool = True


@dataclass(frozen=True)
class RandomBankConfig:
    n: int = 100
    seed: int = 0
    init_scale: float = 1.0
    reduction_factor: int = 16


@dataclass(frozen=True)
class TrainedBankConfig:
    """A bank of single adapters trained on another task's train set, never the evaluated task."""

    n: int = 100
    source: dict[str, str] = field(default_factory=dict)  # evaluated task -> task whose data trains the bank
    slice_size: int = 512
    epochs: int = 4
    batch_size: int = 32
    adapters_per_step: int = 25  # adapters trained side by side in one batched forward
    seed: int = 0


@dataclass(frozen=True)
class MainConfig:
    tasks: tuple[str, ...] = ("sst2", "rte")
    methods: tuple[str, ...] = METHODS
    banks: tuple[str, ...] = ("random", "trained")
    seeds: tuple[int, ...] = (0, 1, 2)
    k_fraction: float = 0.1


@dataclass(frozen=True)
class TuneConfig:
    """A small search on a held-out slice of one task's *train* file (never a dev set)."""

    task: str = "sst2"
    train_size: int = 3000
    holdout_size: int = 1500
    seed: int = 1
    epochs: int = 2
    grid: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # method -> {param: values}


@dataclass(frozen=True)
class SweepConfig:
    task: str = "sst2"
    bank: str = "random"
    n: tuple[int, ...] = (50, 100, 200)
    k_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    methods: tuple[str, ...] = ("hard", "soft")
    seeds: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    tasks: dict[str, TaskConfig]
    main: MainConfig
    purpose: str = ""
    model: str = "minilm"
    data_root: str = "../shared/data"
    device: str = "auto"
    tf32: bool = False
    eval_batch_size: int = 64
    train: TrainDefaults = TrainDefaults()
    random_bank: RandomBankConfig = RandomBankConfig()
    trained_bank: TrainedBankConfig | None = None
    tune: TuneConfig | None = None
    sweeps: SweepConfig | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)


def _tuples(data: dict, keys: Sequence[str]) -> dict:
    return {k: tuple(v) if k in keys and isinstance(v, list) else v for k, v in data.items()}


def parse_config(data: dict) -> SuiteConfig:
    """A validated :class:`SuiteConfig` from the JSON object of a config file."""
    data = dict(data)
    if "name" not in data or "tasks" not in data or "main" not in data:
        raise SuiteError("bad_config", "a suite config needs 'name', 'tasks' and 'main'")
    raw = json.loads(json.dumps(data))
    tasks = {name: _from_dict(TaskConfig, t, f"tasks.{name}") for name, t in data.pop("tasks").items()}
    main = _from_dict(MainConfig, _tuples(data.pop("main"), ("tasks", "methods", "banks", "seeds")), "main")
    parts: dict[str, Any] = {}
    for key, cls in (
        ("train", TrainDefaults),
        ("random_bank", RandomBankConfig),
        ("trained_bank", TrainedBankConfig),
        ("tune", TuneConfig),
    ):
        if data.get(key) is not None:
            parts[key] = _from_dict(cls, data.pop(key), key)
        else:
            data.pop(key, None)
    if data.get("sweeps") is not None:
        parts["sweeps"] = _from_dict(
            SweepConfig, _tuples(data.pop("sweeps"), ("n", "k_fractions", "methods", "seeds")), "sweeps"
        )
    else:
        data.pop("sweeps", None)
    config = _from_dict(SuiteConfig, {**data, **parts, "tasks": tasks, "main": main, "raw": raw}, "config")
    _validate(config)
    return config


def _validate(c: SuiteConfig) -> None:
    for task in c.main.tasks:
        if task not in c.tasks:
            raise SuiteError("bad_config", f"main.tasks names {task!r}, which is not in tasks")
    for m in c.main.methods:
        if m not in METHODS:
            raise SuiteError("bad_config", f"unknown method {m!r}; one of {METHODS}")
    for b in c.main.banks:
        if b not in ("random", "trained"):
            raise SuiteError("bad_config", f"unknown bank {b!r}; one of random, trained")
    uses_trained = "trained" in c.main.banks or (c.sweeps is not None and c.sweeps.bank == "trained")
    if uses_trained and c.trained_bank is None:
        raise SuiteError("bad_config", "the trained bank is used but 'trained_bank' is not configured")
    if c.trained_bank is not None:
        for task, source in c.trained_bank.source.items():
            # The honesty rule, enforced: a task's bank never holds adapters trained on that task.
            if source == task:
                raise SuiteError(
                    "bad_config",
                    f"trained_bank.source maps {task!r} to itself: the evaluated task's "
                    "own data must not train its bank",
                )
            if source not in c.tasks:
                raise SuiteError("bad_config", f"trained_bank.source names {source!r}, which is not in tasks")
        for task in c.main.tasks:
            if "trained" in c.main.banks and task not in c.trained_bank.source:
                raise SuiteError("bad_config", f"trained_bank.source has no source task for {task!r}")
    if c.tune is not None:
        if c.tune.task not in c.tasks:
            raise SuiteError("bad_config", f"tune.task {c.tune.task!r} is not in tasks")
        allowed = {"lr_scores", "lr_head", "lr_adapter", "temperature"}
        for method, params in c.tune.grid.items():
            if method not in METHODS or not set(params) <= allowed or not all(params.values()):
                raise SuiteError(
                    "bad_config", f"tune.grid.{method}: methods {METHODS}, params {sorted(allowed)}"
                )
    if c.sweeps is not None and c.sweeps.task not in c.tasks:
        raise SuiteError("bad_config", f"sweeps.task {c.sweeps.task!r} is not in tasks")


def load_config(path: str | Path) -> SuiteConfig:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SuiteError("bad_config", f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise SuiteError("bad_config", f"{path} is not JSON: {exc}") from exc
    return parse_config(data)


# -- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training + evaluation run. ``key()`` names what it computes, not why it is in the plan."""

    task: str
    method: str
    bank: str  # "random", "trained" or "none" (the baselines do not read the bank)
    n: int  # bank size (0 for the baselines)
    k: int  # hard masks: adapters per layer (0 otherwise)
    seed: int
    epochs: int
    batch_size: int
    max_length: int
    lr_scores: float
    lr_head: float
    lr_adapter: float
    temperature: float
    score_init_std: float
    dropout: bool
    split: str  # "dev" (main, sweeps) or "holdout" (search on a slice of the train file)
    data: str  # what data: file, subset sizes and seeds
    bank_sig: str  # what bank: its construction recipe
    groups: tuple[str, ...] = ()
    curve_every: int = 0
    curve_dev_size: int = 0

    _NOT_KEYED = ("groups", "curve_every", "curve_dev_size")

    def key(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self._NOT_KEYED}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def run_id(self) -> str:
        bank = f"{self.bank}{self.n}" if self.bank != "none" else "none"
        k = f"/k{self.k}" if self.method == "hard" else ""
        rid = f"{self.task}/{self.method}/{bank}{k}/s{self.seed}"
        if self.split == "holdout":
            lr = {
                "head_only": f"lr_head={self.lr_head:g}",
                "single_adapter": f"lr_adapter={self.lr_adapter:g}",
            }
            rid = f"search:{rid}/" + lr.get(self.method, f"lr_scores={self.lr_scores:g}")
        return rid

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            method=self.method,
            k=self.k or None,
            epochs=self.epochs,
            lr_scores=self.lr_scores,
            lr_head=self.lr_head,
            lr_adapter=self.lr_adapter,
            batch_size=self.batch_size,
            max_length=self.max_length,
            temperature=self.temperature,
            score_init_std=self.score_init_std,
            seed=self.seed,
            dropout=self.dropout,
            eval_every=self.curve_every,
        )


def _k_for(n: int, fraction: float) -> int:
    return max(1, min(n, round(n * fraction)))


def _data_sig(t: TaskConfig) -> str:
    return f"{t.train}:{t.train_size}:{t.subset_seed}|{t.dev}:{t.dev_size}"


def random_bank_sig(c: SuiteConfig, n: int) -> str:
    b = c.random_bank
    return f"random:n={n}:seed={b.seed}:scale={b.init_scale}:rf={b.reduction_factor}"


def trained_bank_sig(c: SuiteConfig, task: str, hp: TrainDefaults) -> str:
    b = c.trained_bank
    assert b is not None
    source = c.tasks[b.source[task]]
    recipe = {
        "source": b.source[task],
        "data": source.train,
        "max_length": source.max_length,
        "n": b.n,
        "slice": b.slice_size,
        "epochs": b.epochs,
        "bs": b.batch_size,
        "seed": b.seed,
        "lr_adapter": hp.lr_adapter,
        "lr_head": hp.lr_head,
        "dropout": hp.dropout,
        "rf": c.random_bank.reduction_factor,
    }
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return f"trained:{b.source[task]}:n={b.n}:{digest}"


def _spec(
    c: SuiteConfig,
    task: str,
    method: str,
    bank: str,
    n: int,
    k_fraction: float,
    seed: int,
    hp: TrainDefaults,
    group: str,
    *,
    split: str = "dev",
    data: str | None = None,
    epochs: int | None = None,
    bank_hp: TrainDefaults | None = None,
) -> RunSpec:
    """A run of ``method`` with ``hp``; a trained bank is built with ``bank_hp`` (single_adapter's)."""
    t = c.tasks[task]
    uses_bank = method in ("hard", "soft")
    if not uses_bank:
        bank, n = "none", 0
    if bank == "random":
        bank_sig = random_bank_sig(c, n)
    elif bank == "trained":
        bank_sig = trained_bank_sig(c, task, bank_hp or c.train)
    else:
        bank_sig = ""
    return RunSpec(
        task=task,
        method=method,
        bank=bank,
        n=n,
        k=_k_for(n, k_fraction) if method == "hard" else 0,
        seed=seed,
        epochs=epochs or t.epochs,
        batch_size=t.batch_size,
        max_length=t.max_length,
        lr_scores=hp.lr_scores,
        lr_head=hp.lr_head,
        lr_adapter=hp.lr_adapter,
        temperature=hp.temperature,
        score_init_std=hp.score_init_std,
        dropout=hp.dropout,
        split=split,
        data=data or _data_sig(t),
        bank_sig=bank_sig,
        groups=(group,),
    )


def tune_specs(c: SuiteConfig) -> list[RunSpec]:
    """The search: each listed value of each method's parameter, others at their defaults."""
    if c.tune is None:
        return []
    tc = c.tune
    data = f"holdout:{c.tasks[tc.task].train}:{tc.train_size}+{tc.holdout_size}:{tc.seed}"
    specs = []
    for method, params in tc.grid.items():
        for param, values in params.items():
            for value in values:
                hp = dataclasses.replace(c.train, **{param: value})
                specs.append(
                    _spec(
                        c,
                        tc.task,
                        method,
                        "random",
                        c.random_bank.n,
                        c.main.k_fraction,
                        0,
                        hp,
                        "tune",
                        split="holdout",
                        data=data,
                        epochs=tc.epochs,
                    )
                )
    return specs


def choose_hyperparameters(
    c: SuiteConfig, rows: dict[str, dict]
) -> tuple[dict[str, TrainDefaults], list[dict]]:
    """Per method, the searched value with the best held-out accuracy (ties: the first listed).

    Returns the per-method hyper-parameters and the search table (one entry per searched value).
    """
    chosen = {m: c.train for m in METHODS}
    table = []
    if c.tune is None:
        return chosen, table
    for method, params in c.tune.grid.items():
        hp = c.train
        for param, values in params.items():
            best, best_acc = None, -1.0
            for value in values:
                spec = _spec(
                    c,
                    c.tune.task,
                    method,
                    "random",
                    c.random_bank.n,
                    c.main.k_fraction,
                    0,
                    dataclasses.replace(c.train, **{param: value}),
                    "tune",
                    split="holdout",
                    data=f"holdout:{c.tasks[c.tune.task].train}:{c.tune.train_size}+"
                    f"{c.tune.holdout_size}:{c.tune.seed}",
                    epochs=c.tune.epochs,
                )
                row = rows.get(spec.key())
                acc = row["accuracy"] if row else None
                table.append({"method": method, "param": param, "value": value, "holdout_accuracy": acc})
                if acc is not None and acc > best_acc:
                    best, best_acc = value, acc
            if best is not None:
                hp = dataclasses.replace(hp, **{param: best})
                table[-len(values) :] = [dict(e, chosen=e["value"] == best) for e in table[-len(values) :]]
        chosen[method] = hp
    return chosen, table


def grid_specs(c: SuiteConfig, chosen: dict[str, TrainDefaults]) -> list[RunSpec]:
    """Main table seed by seed (random bank and baselines first), then the sweeps; duplicates merged."""
    specs: list[RunSpec] = []
    m = c.main
    bank_order = [b for b in ("random", "trained") if b in m.banks]
    for seed in m.seeds:
        for bank in bank_order:
            for task in m.tasks:
                for method in m.methods:
                    if method in ("head_only", "single_adapter") and bank != bank_order[0]:
                        continue  # the baselines read no bank: once per seed
                    n = c.trained_bank.n if bank == "trained" and c.trained_bank else c.random_bank.n
                    spec = _spec(
                        c,
                        task,
                        method,
                        bank,
                        n,
                        m.k_fraction,
                        seed,
                        chosen[method],
                        "main",
                        bank_hp=chosen["single_adapter"],
                    )
                    t = c.tasks[task]
                    if (
                        seed == m.seeds[0]
                        and bank == "random"
                        and method in ("hard", "soft")
                        and t.curve_every
                    ):
                        spec = dataclasses.replace(
                            spec,
                            groups=("main", "curves"),
                            curve_every=t.curve_every,
                            curve_dev_size=t.curve_dev_size or 0,
                        )
                    specs.append(spec)
    if c.sweeps is not None:
        s = c.sweeps
        for seed in s.seeds:
            for n in s.n:
                for method in s.methods:
                    fractions = s.k_fractions if method == "hard" else (m.k_fraction,)
                    for fraction in fractions:
                        specs.append(
                            _spec(
                                c,
                                s.task,
                                method,
                                s.bank,
                                n,
                                fraction,
                                seed,
                                chosen[method],
                                "sweep",
                                bank_hp=chosen["single_adapter"],
                            )
                        )
    merged: dict[str, RunSpec] = {}
    for spec in specs:
        key = spec.key()
        if key in merged:
            old = merged[key]
            groups = tuple(dict.fromkeys(old.groups + spec.groups))
            merged[key] = dataclasses.replace(old, groups=groups)
        else:
            merged[key] = spec
    return list(merged.values())


# -- results file --------------------------------------------------------------------------------
class ResultsFile:
    """Append-only JSON lines; a line is written whole, flushed and fsynced before the next run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        good, bad = [], 0
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                good.append(row)
            except ValueError:
                bad += 1
        self.rows = good
        if bad or (text and not text.endswith("\n")):
            # A line cut short by a kill: keep every whole line, drop the partial one.
            log.warning("%s: dropping %d unreadable line(s) left by an interrupted write", self.path, bad)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(
                "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in good), encoding="utf-8"
            )
            os.replace(tmp, self.path)

    def done(self) -> dict[str, dict]:
        """Finished runs by key (the last one wins if a key appears twice)."""
        return {r["key"]: r for r in self.rows if r.get("type") in ("run", "tune") and "key" in r}

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(row, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.append(row)


def read_results(path: str | Path) -> list[dict]:
    """All whole rows of a results file (a partial last line is ignored, the file is not changed)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# -- sizes ---------------------------------------------------------------------------------------
def adapter_bytes(num_layers: int, hidden: int, bottleneck: int, bytes_per_value: int) -> int:
    """One Pfeiffer adapter: L * (d*r + r + r*d + d) values."""
    return num_layers * (2 * hidden * bottleneck + bottleneck + hidden) * bytes_per_value


def profile_sizes(profile: Profile, encoded: bytes) -> dict[str, int]:
    """The .xpm total and its parts: masks (or soft weights, or the adapter), head, the rest."""
    L, N, d, r, C = (
        profile.num_layers,
        profile.num_adapters,
        profile.hidden_size,
        profile.bottleneck,
        profile.num_labels,
    )
    kind = profile.kind
    if kind is ProfileKind.HARD:
        selection = 2 * ((L * N + 7) // 8)
    elif kind is ProfileKind.SOFT:
        selection = 2 * 2 * L * N
    elif kind is ProfileKind.ADAPTER:
        selection = adapter_bytes(L, d, r, 2)
    else:
        selection = 0
    head = 2 * (C * d + C)
    return {
        "profile_bytes": len(encoded),
        "selection_bytes": selection,
        "head_bytes": head,
        "header_bytes": len(encoded) - selection - head,
        "adapter_fp32_bytes": adapter_bytes(L, d, r, 4),
        "adapter_fp16_bytes": adapter_bytes(L, d, r, 2),
    }


# -- the batched trainer of the trained bank's adapters -----------------------------------------
def _mix(*parts: int) -> int:
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:6], "little")


@dataclass
class TrainedAdapter:
    index: int
    adapter: dict[str, torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    labels: list[str]
    train_accuracy: float
    final_loss: float


def _pretokenize(encoder: AdapterEncoder, data: Dataset, max_length: int) -> dict[str, torch.Tensor]:
    inputs = list(data.inputs)
    if inputs and not isinstance(inputs[0], str):
        enc = encoder.tokenizer(
            [p[0] for p in inputs],
            [p[1] for p in inputs],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
    else:
        enc = encoder.tokenizer(
            inputs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt"
        )
    return dict(enc)


def train_adapters(
    encoder: AdapterEncoder,
    slices: Sequence[Dataset],
    indices: Sequence[int],
    *,
    bottleneck: int,
    epochs: int,
    batch_size: int,
    lr_adapter: float,
    lr_head: float,
    max_length: int,
    seed: int,
    dropout: bool = True,
) -> list[TrainedAdapter]:
    """Train ``len(slices)`` single adapters side by side, each on its own slice, in one batched forward.

    The objective and optimiser are those of ``train_profile(method="single_adapter")``: adapter
    initialised as identity (up = 0, down ~ N(0, 0.02)), a linear head, AdamW (weight decay 0.01)
    at ``lr_adapter`` / ``lr_head`` with linear decay, the encoder's dropout on. The loss is the sum
    of each adapter's mean cross-entropy over its own rows, so no adapter's update depends on
    another's data. Adapter ``indices[u]`` seeds its own initialisation and data order, so the
    result does not depend on which adapters share a step.
    """
    U = len(slices)
    if U == 0:
        return []
    sizes = {len(s) for s in slices}
    if len(sizes) != 1:
        raise SuiteError("bad_argument", f"slices must have one size, got {sorted(sizes)}")
    size = sizes.pop()
    labels = sorted({y for s in slices for y in s.labels})
    position = {y: i for i, y in enumerate(labels)}
    device = encoder.device
    L, d, r, C = encoder.num_layers, encoder.hidden_size, bottleneck, len(labels)
    gens = [torch.Generator().manual_seed(_mix(seed, i)) for i in indices]
    init = []
    for g in gens:
        down = torch.randn(L, d, r, generator=g) * 0.02
        head = torch.randn(C, d, generator=g) * 0.02
        init.append((down, head))
    params = nn.ParameterDict(
        {
            "down": nn.Parameter(torch.stack([x[0] for x in init], dim=1)),  # (L, U, d, r): layer-major
            "down_bias": nn.Parameter(torch.zeros(L, U, r)),
            "up": nn.Parameter(torch.zeros(L, U, r, d)),
            "up_bias": nn.Parameter(torch.zeros(L, U, d)),
            "head_weight": nn.Parameter(torch.stack([x[1] for x in init])),  # (U, C, d)
            "head_bias": nn.Parameter(torch.zeros(U, C)),
        }
    ).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": [params["head_weight"], params["head_bias"]], "lr": lr_head},
            {"params": [params[n] for n in TENSOR_NAMES], "lr": lr_adapter},
        ],
        weight_decay=0.01,
    )
    steps_per_epoch = math.ceil(size / batch_size)
    total = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / max(total, 1)))
    tokens = [{k: v.to(device) for k, v in _pretokenize(encoder, s, max_length).items()} for s in slices]
    targets = [torch.tensor([position[y] for y in s.labels], device=device) for s in slices]
    seen = torch.zeros(U)
    correct = torch.zeros(U)
    loss_value = float("nan")
    try:
        for _epoch in range(epochs):
            orders = [torch.randperm(size, generator=g).to(device) for g in gens]
            for b in range(0, size, batch_size):
                picks = [o[b : b + batch_size] for o in orders]
                rows = torch.cat([torch.full((len(p),), u, device=device) for u, p in enumerate(picks)])
                batch = {k: torch.cat([tokens[u][k][p] for u, p in enumerate(picks)]) for k in tokens[0]}
                width = int(batch["attention_mask"].sum(dim=1).max())
                batch = {k: v[:, :width] for k, v in batch.items()}
                target = torch.cat([targets[u][p] for u, p in enumerate(picks)])
                encoder.train(dropout)
                fused = FusedAdapters(*(params[n] for n in TENSOR_NAMES))
                pooled = encoder(batch, fused, rows if U > 1 else None)
                logits = torch.einsum("bd,bcd->bc", pooled.float(), params["head_weight"][rows])
                logits = logits + params["head_bias"][rows]
                per_row = nn.functional.cross_entropy(logits, target, reduction="none")
                counts = torch.bincount(rows, minlength=U).clamp_min(1).to(per_row.dtype)
                loss = (per_row / counts[rows]).sum()  # sum over adapters of each one's mean loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                hits = (logits.argmax(-1) == target).float()
                seen += torch.bincount(rows, minlength=U).cpu().float()
                correct += torch.zeros(U, device=device).index_add_(0, rows, hits).cpu()
                loss_value = loss.item() / U
    finally:
        encoder.eval()
    out = []
    for u, i in enumerate(indices):
        adapter = {n: params[n][:, u].detach().cpu().float().clone() for n in TENSOR_NAMES}
        out.append(
            TrainedAdapter(
                index=i,
                adapter=adapter,
                head_weight=params["head_weight"][u].detach().cpu().clone(),
                head_bias=params["head_bias"][u].detach().cpu().clone(),
                labels=labels,
                train_accuracy=float(correct[u] / max(seen[u], 1)),
                final_loss=loss_value,
            )
        )
    return out


def bank_slices(size: int, n: int, slice_size: int, seed: int) -> tuple[str, list[list[int]]]:
    """Disjoint seeded slices when the source is large enough, else seeded random subsets."""
    slice_size = min(slice_size, size)
    if n * slice_size <= size:
        order = random.Random(seed).sample(range(size), n * slice_size)
        return "disjoint", [sorted(order[i * slice_size : (i + 1) * slice_size]) for i in range(n)]
    return "random", [sorted(random.Random(_mix(seed, i)).sample(range(size), slice_size)) for i in range(n)]


# -- the runner ----------------------------------------------------------------------------------
def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads, {os.cpu_count()} logical cores"


def _checkpoint_dtype(model: str) -> str:
    """How the encoder's weights were stored: the packed copy for the GPU machine says fp16."""
    from safetensors import safe_open

    from xpeft.adapters.encoder import default_model_dir

    folder = default_model_dir() if model in ("minilm", "default") else Path(model)
    path = folder / "model.safetensors"
    if not path.is_file():
        return "unknown"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "xpeft_packed" in meta:
            return meta["xpeft_packed"]
        first = next((k for k in f.keys() if "weight" in k), None)  # noqa: SIM118 - safe_open has no __iter__
        stored = str(f.get_slice(first).get_dtype()).upper() if first else ""
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(stored, stored.lower() or "unknown")


class Suite:
    """Runs a config's grid against one results file. Library entry point: :meth:`run`."""

    def __init__(
        self,
        config: SuiteConfig,
        results: str | Path,
        *,
        data_root: str | None = None,
        model: str | None = None,
        device: str | None = None,
        work_dir: str | Path | None = None,
        deadline_seconds: float | None = None,
        max_runs: int | None = None,
        encoder: AdapterEncoder | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.results = ResultsFile(results)
        self.data_root = Path(data_root or config.data_root)
        self.model = model or config.model
        want = device or config.device
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
        )
        self.work_dir = Path(work_dir) if work_dir else Path(str(results) + ".work")
        self.start = time.monotonic()
        self.deadline = self.start + deadline_seconds if deadline_seconds else None
        self.max_runs = max_runs
        self.progress = progress
        self._encoder = encoder
        self._data: dict[str, Dataset] = {}
        self._banks: dict[str, AdapterBank] = {}
        self._models: dict[str, MultiProfileModel] = {}
        self._rates: dict[tuple[str, str], float] = {}  # (task, method) -> seconds per training step
        self._eval_rates: dict[str, float] = {}  # split data key -> seconds per evaluation
        self.session = f"{socket.gethostname()}-{int(time.time())}-{os.getpid()}"
        self.ran = 0

    # -- resources ---------------------------------------------------------------------------
    @property
    def encoder(self) -> AdapterEncoder:
        if self._encoder is None:
            log.info("loading encoder %s on %s", self.model, self.device)
            self._encoder = load_encoder(self.model, device=self.device)
        return self._encoder

    def _file(self, task: str, which: str) -> Dataset:
        t = self.config.tasks[task]
        key = f"{task}:{which}"
        if key not in self._data:
            path = self.data_root / (t.train if which == "train" else t.dev)
            self._data[key] = load_dataset(path, t.text_col, t.text_pair_col, t.label_col)
        return self._data[key]

    def datasets(self, spec: RunSpec) -> tuple[Dataset, Dataset]:
        """(train, evaluation) data of a run: the seeded train subset and the dev file, or the search split."""
        t = self.config.tasks[spec.task]
        full = self._file(spec.task, "train")
        if spec.split == "holdout":
            tc = self.config.tune
            assert tc is not None
            both = full.subset(tc.train_size + tc.holdout_size, seed=tc.seed)
            order = random.Random(tc.seed).sample(range(len(both)), len(both))
            cut = len(both) - min(tc.holdout_size, len(both) // 2)
            pick = lambda idx: Dataset([both.inputs[i] for i in idx], [both.labels[i] for i in idx])  # noqa: E731
            return pick(sorted(order[:cut])), pick(sorted(order[cut:]))
        train = full.subset(t.train_size, seed=t.subset_seed) if t.train_size else full
        dev = self._file(spec.task, "dev")
        if t.dev_size:
            dev = dev.subset(t.dev_size, seed=t.subset_seed)
        return train, dev

    def bank_for(self, spec: RunSpec) -> AdapterBank:
        if spec.bank == "trained":
            return self.trained_bank(spec.task, spec)
        n = spec.n if spec.bank == "random" else self.config.random_bank.n
        return self.random_bank(n)

    def random_bank(self, n: int) -> AdapterBank:
        sig = random_bank_sig(self.config, n)
        if sig not in self._banks:
            b, enc = self.config.random_bank, self.encoder
            bank = create_random_bank(
                enc.num_layers,
                enc.hidden_size,
                enc.model_id,
                n,
                b.reduction_factor,
                b.seed,
                b.init_scale,
                model_name=self.model,
            )
            self._banks[sig] = bank.to(self.device)
        return self._banks[sig]

    def model_for(self, bank: AdapterBank) -> MultiProfileModel:
        if bank.bank_id not in self._models:
            self._models[bank.bank_id] = MultiProfileModel(self.encoder, bank)
        return self._models[bank.bank_id]

    # -- the trained bank ------------------------------------------------------------------------
    def trained_bank(self, task: str, spec: RunSpec) -> AdapterBank:
        """The bank for ``task``: single adapters trained on slices of another task's train file."""
        sig = spec.bank_sig
        if sig in self._banks:
            return self._banks[sig]
        c = self.config
        tb = c.trained_bank
        assert tb is not None
        source = tb.source[task]
        if source == task:  # also refused by the config check; kept where the bank is built
            raise SuiteError("bad_config", f"the bank for {task} may not be trained on {task}")
        # Adapters are tied to the encoder that trained them: the cache folder names both.
        folder = self.work_dir / f"{sig.replace(':', '_').replace('=', '')}_{self.encoder.model_id}"
        bank_file = folder / "bank.safetensors"
        if bank_file.is_file():
            bank = AdapterBank.load(bank_file)
            if bank.model_id == self.encoder.model_id:
                log.info("trained bank for %s: reusing %s (%s)", task, bank_file, bank.bank_id)
                self._banks[sig] = bank.to(self.device)
                return self._banks[sig]
        folder.mkdir(parents=True, exist_ok=True)
        st = c.tasks[source]
        src = self._file(source, "train")
        mode, slices = bank_slices(len(src), tb.n, tb.slice_size, tb.seed)
        hp = choose_hyperparameters(c, self.results.done())[0]["single_adapter"]
        if trained_bank_sig(c, task, hp) != sig:
            raise SuiteError(
                "bad_config", f"trained bank {sig} asked for before the search chose its learning rate"
            )
        reference = self.random_bank(c.random_bank.n)
        paths = [folder / f"adapter_{i:04d}.xpm" for i in range(tb.n)]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        log.info(
            "trained bank for %s from %s: %d adapters on %s slices of %d (%d to train)",
            task,
            source,
            tb.n,
            mode,
            len(slices[0]),
            len(missing),
        )
        started = time.monotonic()
        accuracies: list[float] = []
        chunk_seconds = None
        steps = math.ceil(len(slices[0]) / tb.batch_size) * tb.epochs
        for start in range(0, len(missing), tb.adapters_per_step):
            chunk = missing[start : start + tb.adapters_per_step]
            self._check_deadline(
                chunk_seconds, f"trained bank for {task} ({len(missing) - start} adapters left)"
            )
            t0 = time.monotonic()
            trained = train_adapters(
                self.encoder,
                [
                    Dataset([src.inputs[j] for j in slices[i]], [src.labels[j] for j in slices[i]])
                    for i in chunk
                ],
                chunk,
                bottleneck=reference.bottleneck,
                epochs=tb.epochs,
                batch_size=tb.batch_size,
                lr_adapter=hp.lr_adapter,
                lr_head=hp.lr_head,
                max_length=st.max_length,
                seed=tb.seed,
                dropout=hp.dropout,
            )
            for a in trained:
                profile = Profile(
                    kind=ProfileKind.ADAPTER,
                    bank_id=reference.bank_id,
                    model_id=self.encoder.model_id,
                    num_layers=reference.num_layers,
                    num_adapters=reference.num_adapters,
                    hidden_size=reference.hidden_size,
                    bottleneck=reference.bottleneck,
                    labels=a.labels,
                    head_weight=a.head_weight,
                    head_bias=a.head_bias,
                    adapter=a.adapter,
                    max_length=st.max_length,
                    meta={
                        "method": "single_adapter",
                        "source": source,
                        "slice": str(a.index),
                        "train_accuracy": f"{a.train_accuracy:.4f}",
                        "model_name": self.model,
                    },
                )
                tmp = paths[a.index].with_suffix(".tmp")
                tmp.write_bytes(xpm.encode(profile))
                os.replace(tmp, paths[a.index])
                accuracies.append(a.train_accuracy)
            chunk_seconds = time.monotonic() - t0
            log.info(
                "  adapters %d-%d trained in %.1fs (mean train accuracy %.3f)",
                chunk[0],
                chunk[-1],
                chunk_seconds,
                sum(a.train_accuracy for a in trained) / len(trained),
            )
        build_seconds = time.monotonic() - started
        adapters = [xpm.load(p) for p in paths]
        if not accuracies:
            accuracies = [float(p.meta.get("train_accuracy", "nan")) for p in adapters]
        bank = stack_adapters(
            [p.adapter_tensors() for p in adapters],
            model_id=self.encoder.model_id,
            init="trained",
            model_name=self.model,
        )
        bank.extra.update({"source_task": source, "slices": mode, "suite_sig": sig})
        bank.save(bank_file)
        self._banks[sig] = bank.to(self.device)
        self.results.append(
            {
                "type": "bank",
                "sig": sig,
                "for_task": task,
                "source_task": source,
                "n": tb.n,
                "slices": mode,
                "slice_size": len(slices[0]),
                "epochs": tb.epochs,
                "batch_size": tb.batch_size,
                "steps": steps,
                "adapters_per_step": tb.adapters_per_step,
                "lr_adapter": hp.lr_adapter,
                "lr_head": hp.lr_head,
                "max_length": st.max_length,
                "bank_id": bank.bank_id,
                "seconds": round(build_seconds, 3),
                "trained_now": len(missing),
                "adapter_train_accuracy_mean": sum(accuracies) / len(accuracies),
                "adapter_train_accuracy_min": min(accuracies),
                "adapter_train_accuracy_max": max(accuracies),
                "session": self.session,
                "finished_at": time.time(),
            }
        )
        return self._banks[sig]

    # -- deadline ----------------------------------------------------------------------------
    def remaining(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def _check_deadline(self, estimate: float | None, what: str) -> None:
        if self.deadline is None:
            return
        left = self.remaining()
        need = (estimate or 0.0) * 1.15 + 2.0
        if left < need:
            raise DeadlineReached(f"{what}: needs about {need:.0f}s, {max(left, 0):.0f}s left")

    def estimate(self, spec: RunSpec, steps: int, eval_key: str) -> float | None:
        rate = self._rates.get((spec.task, spec.method))
        if rate is None:
            same_task = [v for (t, _m), v in self._rates.items() if t == spec.task]
            if not same_task:
                return None
            rate = max(same_task)
        return rate * steps + self._eval_rates.get(eval_key, 0.0)

    # -- one run -----------------------------------------------------------------------------
    def execute(self, spec: RunSpec) -> dict:
        train, evaluation = self.datasets(spec)
        bank = self.bank_for(spec)
        steps = math.ceil(len(train) / spec.batch_size) * spec.epochs
        eval_key = f"{spec.task}:{spec.split}"
        self._check_deadline(self.estimate(spec, steps, eval_key), spec.run_id)
        curve_data = None
        if spec.curve_every:
            curve_data = evaluation.subset(spec.curve_dev_size, seed=1) if spec.curve_dev_size else evaluation
        config = spec.train_config()
        result = train_profile(self.encoder, bank, train, config, eval_data=curve_data, progress=False)
        result.profile.meta["model_name"] = self.model
        blob = xpm.encode(result.profile)
        profile = xpm.decode(blob, bank)  # evaluate the bytes the server would serve (fp16 head)
        t0 = time.monotonic()
        metrics = evaluate(self.model_for(bank), profile, evaluation, batch_size=self.config.eval_batch_size)
        metrics["n_eval"] = metrics.pop("n")  # "n" is the bank size in a row
        eval_seconds = time.monotonic() - t0
        curve_seconds = result.seconds if curve_data is not None else None
        if curve_data is None:
            self._rates[(spec.task, spec.method)] = result.seconds / max(steps, 1)
        self._eval_rates[eval_key] = eval_seconds
        history = result.history
        every = 1 if spec.curve_every else max(1, len(history) // 50)
        curve = [
            {k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
            for i, h in enumerate(history)
            if i % every == 0 or i == len(history) - 1
        ]
        row = {
            "type": "tune" if spec.split == "holdout" else "run",
            "key": spec.key(),
            "run_id": spec.run_id,
            "groups": list(spec.groups),
            **{k: v for k, v in dataclasses.asdict(spec).items() if k != "groups"},
            **metrics,
            "train_size": len(train),
            "steps": len(history),
            "train_seconds": round(result.seconds, 3),
            "eval_seconds": round(eval_seconds, 3),
            "train_seq_per_s": round(len(train) * spec.epochs / result.seconds, 1)
            if result.seconds
            else None,
            "includes_curve_evals": curve_seconds is not None,
            "final_loss": history[-1]["loss"],
            "final_train_accuracy": history[-1]["train_accuracy"],
            **profile_sizes(profile, blob),
            "num_layers": profile.num_layers,
            "hidden_size": profile.hidden_size,
            "bottleneck": profile.bottleneck,
            "num_labels": profile.num_labels,
            "labels": profile.labels,
            "bank_id": bank.bank_id,
            "model_id": self.encoder.model_id,
            "device": describe_device(self.device),
            "curve": curve,
            "session": self.session,
            "finished_at": time.time(),
        }
        if profile.kind is ProfileKind.HARD:
            assert profile.mask_down is not None and profile.mask_up is not None
            row["selected_down"] = [torch.nonzero(m).flatten().tolist() for m in profile.mask_down]
            row["selected_up"] = [torch.nonzero(m).flatten().tolist() for m in profile.mask_up]
        return row

    def kernel_check(self) -> dict:
        """On CUDA: the kernels serving uses against the torch reference, on a random hard profile."""
        if self.device.type != "cuda":
            return {}
        try:
            from xpeft.adapters import kernels
            from xpeft.profiles.synthetic import random_profile

            model = self.model_for(self.random_bank(self.config.random_bank.n))
            profile = random_profile(model.bank, ProfileKind.HARD, seed=0)
            task = self.config.main.tasks[0]
            texts = self._file(task, "dev").inputs[:32]
            with torch.no_grad():
                fast = model.logits(texts, [0] * len(texts), [profile], model.fuse([profile]))
                with kernels.use_kernels(**dict.fromkeys(kernels.KERNELS, False)):
                    ref = model.logits(texts, [0] * len(texts), [profile], model.fuse([profile]))
            diff = max(float((a - b).abs().max()) for a, b in zip(fast, ref, strict=True))
            return {"kernels": kernels.policy(), "kernels_max_logit_diff": diff}
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal: the runs themselves decide
            return {"kernels_check_error": repr(exc)}

    # -- the grid ----------------------------------------------------------------------------
    def _session_row(self, event: str, **extra) -> None:
        row = {
            "type": "session",
            "event": event,
            "session": self.session,
            "time": time.time(),
            "wall_seconds": round(time.monotonic() - self.start, 3),
            **extra,
        }
        self.results.append(row)

    def _run_specs(self, specs: list[RunSpec], bar: tqdm) -> None:
        done = self.results.done()
        for spec in specs:
            if spec.key() in done:
                continue
            if self.max_runs is not None and self.ran >= self.max_runs:
                raise DeadlineReached(f"--max-runs {self.max_runs} reached")
            bar.set_postfix_str(spec.run_id)
            row = self.execute(spec)
            self.results.append(row)
            self.ran += 1
            bar.update(1)
            log.info(
                "done %-40s acc=%.4f train=%.1fs eval=%.1fs bytes=%d",
                spec.run_id,
                row["accuracy"],
                row["train_seconds"],
                row["eval_seconds"],
                row["profile_bytes"],
            )

    def _planned_keys(self) -> set[str]:
        """Keys of the whole plan as far as it is known (the grid uses the search's choices once made)."""
        chosen, _ = choose_hyperparameters(self.config, self.results.done())
        return {s.key() for s in tune_specs(self.config) + grid_specs(self.config, chosen)}

    def run(self) -> str:
        """Run every missing run of the plan in order; returns why it stopped ("complete", "deadline", ...)."""
        c = self.config
        if c.tf32 and self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matrix products
        encoder = self.encoder
        tune = tune_specs(c)
        planned_keys = self._planned_keys()
        planned = len(planned_keys)
        done_before = len(set(self.results.done()) & planned_keys)
        self._session_row(
            "start",
            config_name=c.name,
            config=c.raw,
            argv=sys.argv,
            device=describe_device(self.device),
            device_type=self.device.type,
            torch=torch.__version__,
            transformers=_version("transformers"),
            python=platform.python_version(),
            host=socket.gethostname(),
            cpu_count=os.cpu_count(),
            model=self.model,
            model_id=encoder.model_id,
            model_checkpoint_dtype=_checkpoint_dtype(self.model),
            tf32=bool(c.tf32 and self.device.type == "cuda"),
            planned=planned,
            done_before=done_before,
            deadline_seconds=(self.deadline - self.start) if self.deadline else None,
            **self.kernel_check(),
        )
        bar = tqdm(
            total=planned,
            initial=done_before,
            desc=f"suite {c.name}",
            unit="run",
            disable=not self.progress,
            mininterval=2.0,
        )
        reason = "complete"
        try:
            self._run_specs(tune, bar)
            chosen, _ = choose_hyperparameters(c, self.results.done())
            grid = grid_specs(c, chosen)
            bar.total = len(tune) + len(grid)
            self._run_specs(grid, bar)
        except DeadlineReached as exc:
            reason = "max_runs" if "max-runs" in str(exc) else "deadline"
            log.warning("stopping cleanly (%s): %s", reason, exc)
        except KeyboardInterrupt:
            reason = "interrupted"
            log.warning("interrupted; every finished run is in %s", self.results.path)
        finally:
            bar.close()
        completed = len(set(self.results.done()) & self._planned_keys())
        self._session_row("end", reason=reason, ran=self.ran, completed=completed, planned=planned)
        log.info(
            "%s: %d runs this session, %d of %d planned runs in %s after %.0fs",
            reason,
            self.ran,
            completed,
            planned,
            self.results.path,
            time.monotonic() - self.start,
        )
        return reason


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing distribution is reported, not fatal
        return "unknown"


# -- packing the encoder for a machine with a transfer limit ------------------------------------
def pack_model(out: str | Path, model: str = "minilm", dtype: str = "float16") -> int:
    """Copy an encoder folder with its float weights stored in ``dtype``; returns the folder's bytes.

    Everything but ``model.safetensors`` is copied unchanged, so the copy loads wherever the
    original does; ``load_encoder`` computes in fp32 again (the values keep the fp16 rounding).
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from xpeft.adapters.encoder import default_model_dir

    source = default_model_dir() if model in ("minilm", "default") else Path(model)
    weights = source / "model.safetensors"
    if not weights.is_file():
        raise SuiteError("bad_argument", f"{source} has no model.safetensors to pack")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    target = getattr(torch, dtype)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {
            k: (t.to(target) if t.is_floating_point() else t)
            for k in f.keys()  # noqa: SIM118
            for t in [f.get_tensor(k)]
        }
        meta = dict(f.metadata() or {})
    save_file(tensors, str(out / "model.safetensors"), metadata={**meta, "xpeft_packed": dtype})
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


# -- command line --------------------------------------------------------------------------------
def _setup_logging(path: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = handlers
    log.setLevel(logging.INFO)
    log.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_logging(Path(args.log) if args.log else Path(str(args.out) + ".log"))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = Suite(
        config,
        args.out,
        data_root=args.data_root,
        model=args.model,
        device=args.device,
        work_dir=args.work_dir,
        deadline_seconds=args.deadline_seconds,
        max_runs=args.max_runs,
        progress=not args.no_progress,
    )
    reason = suite.run()
    return 0 if reason in ("complete", "deadline", "max_runs") else 130


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def cmd_report(args: argparse.Namespace) -> int:
    from xpeft.profiles.suite_report import write_report

    command = "python -m xpeft.profiles.suite report " + " ".join(args.argv_rest)
    path = write_report(args.results, args.out, img_dir=args.img_dir, notes=args.notes, command=command)
    print(f"wrote {path}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    size = pack_model(args.out, args.model, args.dtype)
    print(json.dumps({"out": str(args.out), "bytes": size, "dtype": args.dtype}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xpeft.profiles.suite", description="X-PEFT evaluation grid and its report."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a grid; one JSON line per finished run")
    p.add_argument("--config", required=True, help="suite config (JSON), e.g. bench/eval/gpu.json")
    p.add_argument("--out", required=True, help="results JSONL; finished runs in it are skipped")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder holding the task folders (default: the config's, ../shared/data)",
    )
    p.add_argument("--model", default=None, help="encoder alias or folder (default: the config's, minilm)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the config's, auto)")
    p.add_argument("--work-dir", default=None, help="trained-bank cache (default: OUT.work)")
    p.add_argument(
        "--deadline-seconds",
        type=float,
        default=None,
        help="stop before a run that would end later than this many seconds after start",
    )
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (smoke tests)")
    p.add_argument("--log", default=None, help="log file (default: OUT.log)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is much faster on a CPU shared with other busy processes)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="render docs/EVALUATION.md and its plots from a results file")
    p.add_argument("--results", required=True)
    p.add_argument("--out", default="docs/EVALUATION.md")
    p.add_argument("--img-dir", default=None, help="plots folder (default: img/ beside --out)")
    p.add_argument("--notes", default=None, help="a Markdown file included as the discussion section")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "pack-model", help="copy the encoder folder with fp16-stored weights (fits transfer limits)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.set_defaults(func=cmd_pack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv_rest = argv[1:]
    try:
        return args.func(args)
    except XPeftError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
