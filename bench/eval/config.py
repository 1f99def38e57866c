"""The benchmark's JSON config as frozen dataclasses, validated once at load time.

A typo in a config must fail before hours of runs, not silently change what is measured: unknown
keys are refused, sizes are checked, and every (task, variant) training override is tried once
against ``TrainConfig`` itself, so a field the library does not have is an error here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from xpeft.adapters.errors import XPeftError
from xpeft.training.train import METHODS, TrainConfig

TASK_KINDS = (
    "sst2",
    "rte",
    "trec6",
    "mr",
    "sick_e",
    "subj",
    "cr",
    "clinc_domain",
    "clinc_fewshot",
    "clinc_customers",
    "clinc_oos",
    "tweeteval_hate",
    "tweeteval_emoji",
    "tweeteval_stance",
)
BANK_KINDS = ("random", "trained")
BASELINES = ("head_only", "single_adapter")  # read no bank: one run per (profile, seed)
# Set by the task entry or the run itself; a "train" override may not set them.
RESERVED_TRAIN_KEYS = ("method", "seed", "epochs", "batch_size", "max_length")


class ConfigError(XPeftError):
    """A benchmark config that cannot be run as written."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_config", message)


@dataclass(frozen=True)
class TaskSpec:
    """One task entry: which data, how much of it, and how long to train."""

    kind: str
    name: str = ""  # default: the kind (clinc_fewshot: clinc_fewshot<shots>)
    title: str = ""
    train_size: int | None = None  # a fixed seeded subset of each profile's train data
    dev_size: int | None = None  # a fixed seeded subset of each profile's scored data (dev or test)
    subset_seed: int = 0  # seeds the subsets and the few-shot / customer selections
    shots: int | None = None  # clinc_fewshot: training examples per intent
    count: int | None = None  # clinc_customers: number of profiles
    min_intents: int = 5  # clinc_customers: intents per customer, drawn uniformly in [min, max]
    max_intents: int = 20
    max_length: int = 128
    epochs: int = 3
    batch_size: int = 32
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for this task
    # CLINC domain kinds: only these domains (default: all ten); tweeteval_stance: only these targets
    profiles: tuple[str, ...] = ()


@dataclass(frozen=True)
class RandomBankSpec:
    """``create_random_bank`` arguments."""

    num_adapters: int = 100
    reduction_factor: int = 16
    seed: int = 0
    init_scale: float = 1.0


@dataclass(frozen=True)
class TrainedBankSpec:
    """N donor profiles on CLINC's test split (never evaluated data), one single adapter each."""

    num_adapters: int = 50
    reduction_factor: int = 16  # must equal the random bank's: baselines and the bank share shapes
    seed: int = 0
    min_intents: int = 5
    max_intents: int = 20
    max_length: int = 32
    epochs: int = 3
    batch_size: int = 32
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for the donors


@dataclass(frozen=True)
class VariantSpec:
    """Named overrides for research runs; empty tuples mean "all of the config's"."""

    name: str
    methods: tuple[str, ...] = ("hard",)
    tasks: tuple[str, ...] = ()
    banks: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    train: dict[str, Any] = field(default_factory=dict)
    bank: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    name: str
    tasks: tuple[TaskSpec, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    banks: tuple[str, ...]
    random_bank: RandomBankSpec
    trained_bank: TrainedBankSpec
    variants: tuple[VariantSpec, ...]  # the first is always "default", without overrides
    purpose: str = ""
    model: str = "minilm"
    device: str = "auto"
    eval_batch_size: int = 128
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for every run
    # TrainConfig overrides for one method's runs, on top of ``train`` (e.g. pinning the paper's hard masks)
    method_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)  # e.g. {"train_time": {...}}
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)


T = TypeVar("T")


def _build(cls: type[T], data: Any, where: str, **extra: Any) -> T:
    """A dataclass from a JSON object, refusing unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names - {'raw'})}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values, **extra)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _positive(where: str, **values: int | None) -> None:
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")


def _task(data: Any, index: int) -> TaskSpec:
    where = f"tasks[{index}]"
    if not isinstance(data, dict) or data.get("kind") not in TASK_KINDS:
        kind = data.get("kind") if isinstance(data, dict) else data
        raise ConfigError(f"{where}: unknown task kind {kind!r}; one of {list(TASK_KINDS)}")
    task = _build(TaskSpec, {**data, "train": dict(data.get("train", {}))}, where)
    _positive(where, train_size=task.train_size, dev_size=task.dev_size, max_length=task.max_length)
    _positive(where, epochs=task.epochs, batch_size=task.batch_size, shots=task.shots, count=task.count)
    if task.kind == "clinc_fewshot" and task.shots is None:
        raise ConfigError(f"{where}: clinc_fewshot needs 'shots' (e.g. 5 or 10)")
    if task.kind == "clinc_customers":
        if task.count is None:
            raise ConfigError(f"{where}: clinc_customers needs 'count' (profiles)")
        if not 2 <= task.min_intents <= task.max_intents <= 150:
            raise ConfigError(f"{where}: need 2 <= min_intents <= max_intents <= 150")
    default = f"{task.kind}{task.shots}" if task.kind == "clinc_fewshot" else task.kind
    return dataclasses.replace(task, name=task.name or default, title=task.title or task.name or default)


def check_train_overrides(overrides: dict[str, Any], where: str) -> None:
    """Construct ``TrainConfig`` once so an unknown or badly typed field fails here, by name."""
    reserved = sorted(set(overrides) & set(RESERVED_TRAIN_KEYS))
    if reserved:
        raise ConfigError(f"{where}: {reserved} are set by the task and the run, not by 'train' overrides")
    try:
        TrainConfig(**overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: TrainConfig refuses these overrides: {exc}") from exc


def _variant(name: str, data: Any, c: dict[str, Any]) -> VariantSpec:
    where = f"variants.{name}"
    v = _build(
        VariantSpec,
        {**data, "train": dict(data.get("train", {}))} if isinstance(data, dict) else data,
        where,
        name=name,
    )
    for key, allowed in (("methods", c["methods"]), ("tasks", c["task_names"]), ("banks", c["banks"])):
        bad = sorted(set(getattr(v, key)) - set(allowed))
        if bad:
            raise ConfigError(f"{where}: {key} {bad} are not in the config's {key} {list(allowed)}")
    bad_seeds = sorted(set(v.seeds) - set(c["seeds"]))
    if bad_seeds:
        raise ConfigError(f"{where}: seeds {bad_seeds} are not in the config's seeds {list(c['seeds'])}")
    if v.bank:
        uses_bank = [m for m in v.methods if m not in BASELINES]
        for bank in (v.banks or c["banks"]) if uses_bank else ():
            spec = RandomBankSpec if bank == "random" else TrainedBankSpec
            known = {f.name for f in dataclasses.fields(spec)} - {"train"}
            unknown = sorted(set(v.bank) - known)
            if unknown:
                raise ConfigError(
                    f"{where}: bank override(s) {unknown} do not apply to the {bank} bank (known: "
                    f'{sorted(known)}); restrict the variant with "banks": [...]'
                )
    return v


def parse_config(data: dict[str, Any]) -> EvalConfig:
    """A validated :class:`EvalConfig` from a config file's JSON object."""
    if not isinstance(data, dict):
        raise ConfigError("a config is a JSON object")
    raw = json.loads(json.dumps(data))
    data = dict(data)
    for key in ("name", "tasks"):
        if key not in data:
            raise ConfigError(f"a config needs {key!r}")
    if not isinstance(data["tasks"], list) or not data["tasks"]:
        raise ConfigError("'tasks' must be a non-empty list of task entries")
    tasks = tuple(_task(t, i) for i, t in enumerate(data.pop("tasks")))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"task names must be unique, got {names} (set 'name' on repeated kinds)")
    random_bank = _build(RandomBankSpec, data.pop("random_bank", {}), "random_bank")
    trained = data.pop("trained_bank", {})
    trained_bank = _build(
        TrainedBankSpec, {**trained, "train": dict(trained.get("train", {}))}, "trained_bank"
    )
    _positive(
        "random_bank", num_adapters=random_bank.num_adapters, reduction_factor=random_bank.reduction_factor
    )
    _positive("trained_bank", num_adapters=trained_bank.num_adapters, epochs=trained_bank.epochs)
    if trained_bank.reduction_factor != random_bank.reduction_factor:
        raise ConfigError("trained_bank.reduction_factor must equal random_bank.reduction_factor")
    variants_raw = data.pop("variants", {})
    if not isinstance(variants_raw, dict) or "default" in variants_raw:
        raise ConfigError(
            "'variants' maps names other than 'default' (the run without overrides) to overrides"
        )
    top = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    top.setdefault("methods", METHODS)
    top.setdefault("seeds", (0, 1, 2))
    top.setdefault("banks", BANK_KINDS)
    default = VariantSpec("default", methods=tuple(top["methods"]))
    context = {"methods": top["methods"], "banks": top["banks"], "seeds": top["seeds"], "task_names": names}
    variants = (default, *(_variant(n, v, context) for n, v in variants_raw.items()))
    config = _build(
        EvalConfig,
        top,
        "config",
        tasks=tasks,
        random_bank=random_bank,
        trained_bank=trained_bank,
        variants=variants,
        raw=raw,
    )
    _validate(config)
    return config


def _validate(c: EvalConfig) -> None:
    for key, allowed in (("methods", METHODS), ("banks", BANK_KINDS)):
        bad = sorted(set(getattr(c, key)) - set(allowed))
        if bad or not getattr(c, key):
            raise ConfigError(f"{key} {bad or '[]'} not allowed; choose from {list(allowed)}")
    if not c.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in c.seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {list(c.seeds)}")
    check_train_overrides(c.train, "train")
    for method, overrides in c.method_train.items():
        if method not in c.methods or not isinstance(overrides, dict):
            raise ConfigError(f"method_train.{method}: an object of overrides for one of {list(c.methods)}")
        check_train_overrides({**c.train, **overrides}, f"method_train.{method}")
    check_train_overrides(c.trained_bank.train, "trained_bank.train")
    for v in c.variants:
        for t in c.tasks:
            if not v.tasks or t.name in v.tasks:
                for m in v.methods:
                    merged = {**c.train, **c.method_train.get(m, {}), **t.train, **v.train}
                    check_train_overrides(merged, f"variants.{v.name} on {t.name}")


def load_config(path: str | Path) -> EvalConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"no config file at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return parse_config(data)
