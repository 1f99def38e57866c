"""Task definitions -> the evaluated profiles, each with its own train and dev ``Dataset``.

Every selection (subsets, few-shot examples, customers' intents) is drawn from a string-seeded
``random.Random``, so the same config gives the same profiles on any machine, in any worker.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.eval.config import ConfigError, TaskSpec
from xpeft.training.data import Dataset, load_dataset

CLINC = "clinc150"
STANCE = "tweeteval_stance"  # one folder per target: five small customers of one task


@dataclass(frozen=True)
class FileTask:
    """A single-profile task read from ``<folder>/train.tsv`` and its scored split."""

    folder: str
    pair: bool  # sentence pairs (sentence1, sentence2) rather than one sentence
    scored: str  # the file it is scored on: dev.tsv where the test labels are not public, else test.tsv


FILE_TASKS = {
    "sst2": FileTask("sst2", False, "dev.tsv"),
    "rte": FileTask("rte", True, "dev.tsv"),
    "trec6": FileTask("trec6", False, "test.tsv"),
    "mr": FileTask("mr", False, "test.tsv"),
    "sick_e": FileTask("sick_e", True, "test.tsv"),
    "subj": FileTask("subj", False, "test.tsv"),
    "cr": FileTask("cr", False, "test.tsv"),
    "tweeteval_hate": FileTask("tweeteval_hate", False, "test.tsv"),
    "tweeteval_emoji": FileTask("tweeteval_emoji", False, "test.tsv"),
}


@dataclass(frozen=True)
class EvalProfile:
    """One customer's classifier: what it trains on and what it is scored on."""

    task: str
    name: str
    train: Dataset
    dev: Dataset


def texts(data: Dataset) -> set[str]:
    """Every sentence of a dataset (both sides of a pair), for overlap checks."""
    out: set[str] = set()
    for x in data.inputs:
        out.update((x,) if isinstance(x, str) else x)
    return out


def _pick(data: Dataset, index: list[int]) -> Dataset:
    return Dataset([data.inputs[i] for i in index], [data.labels[i] for i in index])


def fewshot(data: Dataset, shots: int, seed: str) -> Dataset:
    """``shots`` examples per label (all of a label's when it has fewer), in file order."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(data.labels):
        by_label[label].append(i)
    index: list[int] = []
    for label in sorted(by_label):
        rows = by_label[label]
        index += rows if len(rows) <= shots else random.Random(f"{seed}:{label}").sample(rows, shots)
    return _pick(data, sorted(index))


def customer_intents(all_intents: list[str], spec: TaskSpec, index: int) -> list[str]:
    """The intents of customer ``index``: a seeded random subset of ``min..max`` of them."""
    rng = random.Random(f"clinc_customers:{spec.subset_seed}:{index}")
    return sorted(rng.sample(sorted(all_intents), rng.randint(spec.min_intents, spec.max_intents)))


def only_labels(data: Dataset, labels: set[str]) -> Dataset:
    return _pick(data, [i for i, y in enumerate(data.labels) if y in labels])


class TaskData:
    """Reads task files under a data root once per process and builds profiles from them."""

    def __init__(self, data_root: str | Path) -> None:
        self.root = Path(data_root)
        self._files: dict[str, Dataset] = {}

    def file(self, relative: str, pair: bool = False) -> Dataset:
        if relative not in self._files:
            path = self.root / relative
            if pair:
                self._files[relative] = load_dataset(path, "sentence1", "sentence2", "label")
            else:
                self._files[relative] = load_dataset(path)
        return self._files[relative]

    def domains(self) -> list[str]:
        folder = self.root / CLINC / "domains"
        if not folder.is_dir():
            raise ConfigError(f"no CLINC domain folders at {folder} (is --data-root right?)")
        return sorted(p.name for p in folder.iterdir() if (p / "train.tsv").is_file())

    def _need(self, spec: TaskSpec, *relative: str) -> None:
        """Fail at plan time, not in every run, when a task's files are not under the data root."""
        missing = [r for r in relative if not (self.root / r).is_file()]
        if missing:
            raise ConfigError(
                f"{spec.name}: no {', '.join(missing)} under {self.root} (is --data-root right?)"
            )

    def stance_targets(self) -> list[str]:
        """The TweetEval stance targets present: folders holding both a train and a test file."""
        folder = self.root / STANCE
        if not folder.is_dir():
            raise ConfigError(f"no TweetEval stance target folders at {folder} (is --data-root right?)")
        return sorted(
            p.name for p in folder.iterdir() if (p / "train.tsv").is_file() and (p / "test.tsv").is_file()
        )

    def profile_names(self, spec: TaskSpec) -> list[str]:
        """The task's profiles, cheaply (no data is read for the single-profile tasks)."""
        if spec.kind in FILE_TASKS:
            task = FILE_TASKS[spec.kind]
            self._need(spec, f"{task.folder}/train.tsv", f"{task.folder}/{task.scored}")
            return [spec.kind]
        if spec.kind == STANCE:
            targets = self.stance_targets()
            unknown = sorted(set(spec.profiles) - set(targets))
            if unknown or not targets:
                raise ConfigError(
                    f"{spec.name}: no TweetEval stance target(s) {unknown or 'at all'} with train.tsv and "
                    f"test.tsv under {self.root / STANCE}; there are {targets}"
                )
            return [t for t in targets if not spec.profiles or t in spec.profiles]
        if spec.kind == "clinc_customers":
            assert spec.count is not None
            width = len(str(spec.count - 1))
            return [f"c{i:0{width}d}" for i in range(spec.count)]
        domains = self.domains()
        unknown = sorted(set(spec.profiles) - set(domains))
        if unknown:
            raise ConfigError(f"{spec.name}: no CLINC domains named {unknown}; there are {domains}")
        return [d for d in domains if not spec.profiles or d in spec.profiles]

    def profile(self, spec: TaskSpec, name: str) -> EvalProfile:
        """One evaluated profile: its data before the task's size limits, then those limits."""
        if spec.kind in FILE_TASKS:
            task = FILE_TASKS[spec.kind]
            train = self.file(f"{task.folder}/train.tsv", task.pair)
            dev = self.file(f"{task.folder}/{task.scored}", task.pair)
        elif spec.kind == STANCE:
            train = self.file(f"{STANCE}/{name}/train.tsv")
            dev = self.file(f"{STANCE}/{name}/test.tsv")  # scored on test, as the TweetEval paper reports
        elif spec.kind == "clinc_customers":
            everything = self.file(f"{CLINC}/train.tsv")
            index = int(name[1:])
            intents = set(customer_intents(sorted(set(everything.labels)), spec, index))
            train = only_labels(everything, intents)
            dev = only_labels(self.file(f"{CLINC}/dev.tsv"), intents)
        else:
            train = self.file(f"{CLINC}/domains/{name}/train.tsv")
            dev = self.file(f"{CLINC}/domains/{name}/dev.tsv")
            if spec.kind == "clinc_fewshot":
                assert spec.shots is not None
                train = fewshot(train, spec.shots, f"clinc_fewshot:{spec.subset_seed}:{name}")
        if spec.train_size:
            train = train.subset(spec.train_size, seed=spec.subset_seed)
        if spec.dev_size:
            dev = dev.subset(spec.dev_size, seed=spec.subset_seed)
        return EvalProfile(spec.name, name, train, dev)

    def profiles(self, spec: TaskSpec) -> list[EvalProfile]:
        return [self.profile(spec, name) for name in self.profile_names(spec)]
