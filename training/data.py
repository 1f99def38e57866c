"""Labelled text data from .tsv, .csv or .jsonl, chosen by the file extension."""

from __future__ import annotations

import csv
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xpeft.adapters.encoder import TextInput
from xpeft.adapters.errors import XPeftError
from xpeft.profiles.text import TextError, check_text, load_json

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
# A label that sorts as a number: ASCII digits only (``"²"`` and ``"--1"`` pass ``isdigit`` checks
# but not ``int``).
_INTEGER = re.compile(r"-?[0-9]+")


class DataError(XPeftError):
    """A data file that is missing, of an unknown type, or lacks the named columns."""


@dataclass
class Dataset:
    """Inputs (texts or text pairs) and their label names, in file order."""

    inputs: list[TextInput]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.inputs)

    def label_names(self) -> list[str]:
        """Distinct labels, numerically sorted when they are all integers, else alphabetically."""
        names = set(self.labels)
        if all(_INTEGER.fullmatch(n) for n in names):
            return sorted(names, key=int)
        return sorted(names)

    def subset(self, size: int, seed: int = 0) -> Dataset:
        """A fixed, seeded random subset (the whole set when ``size`` is larger)."""
        if size >= len(self):
            return self
        return self.select(sorted(random.Random(seed).sample(range(len(self)), size)))

    def select(self, index: Sequence[int]) -> Dataset:
        """The examples at ``index``, in that order."""
        return Dataset([self.inputs[i] for i in index], [self.labels[i] for i in index])


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".tsv":
            # GLUE-style TSV: quotes are literal text, never field delimiters.
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if suffix == ".csv":
            return list(csv.DictReader(f))
        if suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = load_json(line, f"line {lineno}")
                    except TextError as exc:
                        raise DataError("bad_data", f"{path}: {exc.message}") from None
                    if not isinstance(row, dict):
                        raise DataError("bad_data", f"{path}: line {lineno} is not a JSON object")
                    rows.append(row)
            return rows
    raise DataError("bad_data", f"{path}: unknown extension {suffix!r}; use .tsv, .csv or .jsonl")


def load_dataset(
    path: str | Path, text_col: str = "sentence", text_pair_col: str | None = None, label_col: str = "label"
) -> Dataset:
    path = Path(path)
    if path.is_dir():
        raise DataError("bad_data", f"{path} is a folder; name the file (e.g. {path}/train.tsv)")
    if not path.is_file():
        raise DataError("bad_data", f"no data file at {path}")
    try:
        rows = _rows(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError("bad_data", f"{path} cannot be read: {type(exc).__name__}: {exc}"[:300]) from None
    if not rows:
        raise DataError("bad_data", f"{path} has no rows")
    columns = [text_col, label_col] + ([text_pair_col] if text_pair_col else [])
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError("bad_data", f"{path} lacks column(s) {missing}; it has {sorted(rows[0])}")
    inputs: list[TextInput] = []
    labels: list[str] = []
    for n, row in enumerate(rows, 1):
        pair = row.get(text_pair_col) if text_pair_col else None
        x, label = read_example(
            f"{path}: row {n}", row.get(text_col), row.get(label_col), pair, pair_required=bool(text_pair_col)
        )
        inputs.append(x)
        labels.append(label)
    return Dataset(inputs, labels)


def _kind(value: object) -> str:
    if value is None:
        return "missing (or null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return "a number that is not an integer"
    return type(value).__name__


def read_example(
    where: str, text: object, label: object, pair: object = None, pair_required: bool = False
) -> tuple[TextInput, str]:
    """One example as every reader takes it (the data files here, the training route's JSON body):
    the text (and pair) must be strings, the label a string or an integer. A missing cell, a JSON
    null, a boolean, an object or a list is refused (:class:`DataError` naming ``where``), never
    turned into a class such as ``"None"`` or ``"True"``."""
    if not isinstance(text, str):
        raise DataError("bad_data", f"{where}: the text is {_kind(text)}; it must be a string")
    if (pair is not None or pair_required) and not isinstance(pair, str):
        raise DataError("bad_data", f"{where}: the text pair is {_kind(pair)}; it must be a string")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise DataError(
            "bad_data", f"{where}: the label is {_kind(label)}; it must be a string or an integer"
        )
    return (text if pair is None else (text, pair)), str(label)


def check_dataset(data: Dataset, max_text_chars: int, max_label_chars: int) -> None:
    """Every text and label through the one text rule (:func:`~xpeft.profiles.text.check_text`),
    so that the CLI and the server refuse the same data; :class:`DataError` names the example."""
    for n, (x, label) in enumerate(zip(data.inputs, data.labels, strict=True)):
        try:
            for text in [x] if isinstance(x, str) else list(x):
                check_text(text, f"example {n}: the text", max_text_chars, multiline=True)
            check_text(label, f"example {n}: the label", max_label_chars)
        except TextError as exc:
            raise DataError("bad_data", exc.message) from None
