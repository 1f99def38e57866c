"""A training request, validated completely before anything is queued.

Two forms: a JSON body (``{"examples": [{"text", "text_pair", "label"}], "method": ...}``), or a
labelled file as the body (``.tsv``, ``.csv`` or ``.jsonl``, chosen by ``Content-Type`` or
``?format=``) read by the library's own :func:`~xpeft.training.data.load_dataset` with the CLI's
column options as query parameters. Either way the same checks run: sizes and lengths, labels
(at least two classes left for training), the options' types, and ``TrainConfig.validate``.
"""

from __future__ import annotations

import csv
import json
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.format_header import LIMITS
from xpeft.profiles.text import TextError, load_json
from xpeft.server.errors import ApiError
from xpeft.server.settings import Settings
from xpeft.training.abstain_fit import check_training_data
from xpeft.training.data import Dataset, check_dataset, load_dataset, read_example
from xpeft.training.train_config import ABSTAIN_FIELDS, TrainConfig

# TrainConfig fields a request may set (the rest keep the library's defaults)
CONFIG_FIELDS = (
    "method",
    "k",
    "epochs",
    "batch_size",
    "max_length",
    "seed",
    "lr_scores",
    "lr_head",
    "lr_adapter",
    "lr_gain",
    "temperature",
    "scale_power",
    "gain",
    "weighted",
    "estimator",
    "tied",
    "out_scale",
    *ABSTAIN_FIELDS,
)
_TYPES = {f.name: f.type for f in fields(TrainConfig)}
SERVICE_FIELDS = ("eval_fraction", "keep_if_better")
FILE_FIELDS = ("format", "text_col", "text_pair_col", "label_col")
FORMATS = {
    "text/tab-separated-values": "tsv",
    "text/tsv": "tsv",
    "text/csv": "csv",
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/jsonlines": "jsonl",
}
DEFAULT_EVAL_FRACTION = 0.1
MAX_EVAL_FRACTION = 0.5
MAX_BATCH_SIZE = 1024
MAX_LENGTH = 512
# torch seeds the trainer's generators with seed and seed + 1 (both must fit 64 bits)
MAX_SEED = 2**63 - 1


def invalid(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(422, code, message)


@dataclass
class TrainRequest:
    data: Dataset
    config: TrainConfig
    eval_fraction: float
    keep_if_better: bool

    def options(self) -> dict:
        """What the job record shows and the worker reads back."""
        given = {name: getattr(self.config, name) for name in CONFIG_FIELDS}
        return {**given, "eval_fraction": self.eval_fraction, "keep_if_better": self.keep_if_better}

    def encoded_examples(self) -> bytes:
        inputs = [x if isinstance(x, str) else list(x) for x in self.data.inputs]
        return json.dumps({"inputs": inputs, "labels": self.data.labels}, ensure_ascii=False).encode()


def decode_examples(raw: bytes) -> Dataset:
    body = json.loads(raw)
    inputs = [x if isinstance(x, str) else (x[0], x[1]) for x in body["inputs"]]
    return Dataset(inputs, list(body["labels"]))


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """A seeded held-out share (at least one example when ``fraction > 0``) and the rest."""
    if fraction <= 0:
        return data, None
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(data) * fraction))
    return data.select(sorted(order[n_eval:])), data.select(sorted(order[:n_eval]))


def _typed(name: str, value: object, from_query: bool) -> object:
    """A request value as the type the option takes; query strings are converted first."""
    kind = _TYPES.get(name, {"eval_fraction": "float", "keep_if_better": "bool"}.get(name, "str"))
    if from_query and isinstance(value, str):
        text = value
        try:
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1")
            elif "int" in kind:
                value = int(value)
            elif "float" in kind:
                value = float(value)
        except ValueError:
            raise invalid(f"{name}={text[:50]!r} is not a valid {kind.split()[0]}") from None
    ok = (
        (isinstance(value, bool) if "bool" in kind else False)
        or ("int" in kind and type(value) is int)
        or ("float" in kind and type(value) in (int, float))
        or (kind.split()[0] == "str" and isinstance(value, str))
    )
    if not ok:
        raise invalid(f"{name} must be a {kind.split()[0]}, got {json.dumps(value)[:50]}")
    return value


def parse_options(raw: Mapping[str, object], from_query: bool, allowed: tuple[str, ...]) -> dict:
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise invalid(f"unknown field(s) {unknown[:5]}; allowed: {', '.join(allowed)}")
    return {name: _typed(name, value, from_query) for name, value in raw.items()}


def check_trainable(config: TrainConfig, num_adapters: int, bottleneck: int) -> None:
    """Everything about a config the trainer would refuse, against the served bank's ``N`` and
    ``r``: the route runs it before a job is queued, the trainer again before it trains.
    :class:`XPeftError`."""
    config.validate()
    if type(config.seed) is not int or not 0 <= config.seed <= MAX_SEED:
        raise XPeftError(
            "bad_argument", f"seed must be an integer in [0, 2**63 - 1], got {config.seed}"[:200]
        )
    config.check_bank(num_adapters, bottleneck)  # k: at most N adapters (hard), N*r units (units)


def _config(
    options: dict, settings: Settings, num_adapters: int, bottleneck: int
) -> tuple[TrainConfig, float, bool]:
    config = TrainConfig(**{k: v for k, v in options.items() if k in CONFIG_FIELDS})
    try:
        check_trainable(config, num_adapters, bottleneck)
    except XPeftError as exc:
        raise invalid(exc.message, exc.code) from None
    limits = (
        ("epochs", settings.max_train_epochs),
        ("batch_size", MAX_BATCH_SIZE),
        ("max_length", MAX_LENGTH),
    )
    for name, most in limits:
        if getattr(config, name) > most:
            raise invalid(f"{name} must be at most {most}, got {getattr(config, name)}", "bad_argument")
    fraction = float(options.get("eval_fraction", DEFAULT_EVAL_FRACTION))
    if not 0.0 <= fraction <= MAX_EVAL_FRACTION:
        raise invalid(f"eval_fraction must lie in [0, {MAX_EVAL_FRACTION}], got {fraction}", "bad_argument")
    keep = bool(options.get("keep_if_better", False))
    if keep and fraction == 0:
        raise invalid("keep_if_better compares held-out accuracy: it needs eval_fraction > 0", "bad_argument")
    return config, fraction, keep


def _check_data(data: Dataset, settings: Settings, fraction: float, seed: int) -> None:
    if len(data) == 0:
        raise invalid("no examples", "bad_data")
    if len(data) > settings.max_train_examples:
        raise invalid(f"{len(data)} examples; at most {settings.max_train_examples}", "bad_data")
    try:  # the one text rule, as xpeft train applies it
        check_dataset(data, settings.max_text_chars, settings.max_label_chars)
    except XPeftError as exc:
        raise invalid(exc.message, "bad_data") from None
    labels = set(data.labels)
    if len(labels) > settings.max_labels:
        raise invalid(f"{len(labels)} distinct labels; at most {settings.max_labels}", "bad_data")
    train, _ = split(data, fraction, seed)
    if len(set(train.labels)) < 2:
        raise invalid(
            f"training needs at least 2 classes; the examples left for training have {sorted(set(train.labels))[:2]}",
            "bad_data",
        )


def _json_examples(body: object, settings: Settings) -> tuple[Dataset, dict]:
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object {"examples": [...], ...}')
    examples = body.get("examples")
    if not isinstance(examples, list):
        raise invalid("examples is required: a list of {text, text_pair?, label}")
    if len(examples) > settings.max_train_examples:
        raise invalid(f"{len(examples)} examples; at most {settings.max_train_examples}", "bad_data")
    inputs: list = []
    labels: list[str] = []
    for n, ex in enumerate(examples):
        if not isinstance(ex, dict) or set(ex) - {"text", "text_pair", "label"}:
            raise invalid(f"example {n} must be an object with text, label and optionally text_pair")
        try:  # the data files' own rule: nothing becomes a class "None" or "True"
            x, label = read_example(f"example {n}", ex.get("text"), ex.get("label"), ex.get("text_pair"))
        except XPeftError as exc:
            raise invalid(exc.message) from None
        inputs.append(x)
        labels.append(label)
    options = {k: v for k, v in body.items() if k != "examples"}
    return Dataset(inputs, labels), parse_options(options, False, CONFIG_FIELDS + SERVICE_FIELDS)


def _file_examples(raw: bytes, fmt: str, columns: dict) -> Dataset:
    with tempfile.TemporaryDirectory(prefix="xpeft-train-") as tmp:
        path = Path(tmp) / f"upload.{fmt}"
        path.write_bytes(raw)
        try:
            data = load_dataset(path, **columns)
        except XPeftError as exc:  # not UTF-8, a broken CSV or JSON line, too deep, missing columns
            raise invalid(exc.message.replace(str(path), "the uploaded file"), "bad_data") from None
        except (csv.Error, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # anything else the readers raise is still the file's fault: a typed 422, never a 500
            raise invalid(
                f"the uploaded {fmt} file cannot be read: {type(exc).__name__}", "bad_data"
            ) from None
    return data


def parse_train_request(
    raw: bytes,
    content_type: str | None,
    query: Mapping[str, str],
    settings: Settings,
    num_adapters: int | None = None,
    bottleneck: int | None = None,
) -> TrainRequest:
    """Everything checked; raises :class:`ApiError` (422 or 415) with a stable code.

    ``num_adapters``, ``bottleneck``: the served bank's N and r, which bound ``k`` (``None``: no
    bank known, only the format's own bounds are checked)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json" and "format" not in query:
        if query:
            raise invalid("with a JSON body, put the options in the body, not the query")
        try:
            body = load_json(raw)
        except TextError as exc:  # not JSON, not UTF-8, or nested past the bound
            raise invalid(exc.message[:200]) from None
        data, options = _json_examples(body, settings)
    else:
        fmt = query.get("format") or FORMATS.get(media)
        if fmt not in ("tsv", "csv", "jsonl"):
            raise ApiError(
                415,
                "unsupported_media_type",
                "send JSON (application/json) or a labelled file: text/tab-separated-values, text/csv "
                "or application/jsonl (or ?format=tsv|csv|jsonl)",
            )
        options = parse_options(dict(query), True, CONFIG_FIELDS + SERVICE_FIELDS + FILE_FIELDS)
        columns = {
            "text_col": options.pop("text_col", "sentence"),
            "text_pair_col": options.pop("text_pair_col", None),
            "label_col": options.pop("label_col", "label"),
        }
        options.pop("format", None)
        data = _file_examples(raw, fmt, columns)
    shape = (
        LIMITS["N"] if num_adapters is None else num_adapters,
        LIMITS["r"] if bottleneck is None else bottleneck,
    )
    config, fraction, keep = _config(options, settings, *shape)
    _check_data(data, settings, fraction, config.seed)
    _check_abstain_labels(data, config)
    try:  # what the trainer checks before it trains, on the same cut of the same rows
        check_training_data(split(data, fraction, config.seed)[0], config)
    except XPeftError as exc:
        raise invalid(exc.message, "bad_data") from None
    work = len(data) * config.epochs
    if work > settings.max_train_example_epochs:
        raise invalid(
            f"{len(data)} examples x {config.epochs} epochs = {work}; one job may ask for at most "
            f"{settings.max_train_example_epochs} (XPEFT_MAX_TRAIN_EXAMPLE_EPOCHS): fewer epochs or examples",
            "training_too_large",
        )
    return TrainRequest(data, config, fraction, keep)


def _check_abstain_labels(data: Dataset, config: TrainConfig) -> None:
    """The rule's labels against the examples, before a job is queued: the fallback must be one of
    the classes, the OOS label must occur."""
    labels = set(data.labels)
    if config.oos_label is not None and config.oos_label not in labels:
        raise invalid(f"no example carries the OOS label {config.oos_label[:64]!r}", "bad_data")
    classes = labels - {config.oos_label}
    if config.fallback_label is not None and config.fallback_label not in classes:
        raise invalid(
            f"fallback label {config.fallback_label[:64]!r} is not one of the example labels", "bad_data"
        )
