"""From result rows to the numbers the report prints: group means, paired differences, targets.

Multi-profile groups (CLINC domains, few-shot, customers, TweetEval stance) are averaged over their profiles per
seed first, then summarised over seeds; a seed that lacks some of the group's profiles is left
out of that summary (and counted), so a grid stopped early never mixes partial means in.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bench.eval.config import BASELINES
from bench.eval.stats import Interval, Summary, paired, summarize, t_interval

Pairs = dict[tuple[str, int], float]  # (profile, seed) -> value
MIN_ADAPTER_GAIN = 2.0  # points: a group "discriminates" where an adapter beats a plain head by this much
TITLES = {
    "sst2": "SST-2",
    "rte": "RTE",
    "trec6": "TREC-6",
    "mr": "MR",
    "sick_e": "SICK-E",
    "subj": "SUBJ",
    "cr": "CR",
    "clinc_domain": "CLINC domains",
    "clinc_customers": "Customers",
    "clinc_oos": "CLINC domains, rule held out (abstention runs)",
    "tweeteval_hate": "TweetEval hate",
    "tweeteval_emoji": "TweetEval emoji (20 classes)",
    "tweeteval_stance": "TweetEval stance",
}


@dataclass(frozen=True)
class Group:
    """A task of the config: one row of the main table."""

    name: str
    kind: str
    title: str


class Results:
    """The rows of one results file, indexed for the report."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        runs: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r.get("type") == "run":
                runs[r["key"]] = r  # the last row of a key wins
        self.runs = list(runs.values())
        self.sessions = [r for r in rows if r.get("type") == "session" and r.get("event") == "start"]
        self.ends = [r for r in rows if r.get("type") == "session" and r.get("event") == "end"]
        self.banks = {r["key"]: r for r in rows if r.get("type") == "bank"}
        self.errors = [r for r in rows if r.get("type") == "error" and r["key"] not in runs]
        self.config: dict[str, Any] = self.sessions[-1]["config"] if self.sessions else {}
        self.groups = self._groups()
        self._index: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in self.runs:
            self._index[(r["task"], r["method"], r["bank"], r["variant"])].append(r)

    def _groups(self) -> list[Group]:
        groups, seen = [], set()
        for t in self.config.get("tasks", []):
            kind = t["kind"]
            name = t.get("name") or (f"{kind}{t['shots']}" if kind == "clinc_fewshot" else kind)
            default = f"Few-shot {t.get('shots')} per intent" if kind == "clinc_fewshot" else TITLES[kind]
            groups.append(Group(name, kind, t.get("title") or default))
            seen.add(name)
        for r in self.runs:  # runs of tasks the last config no longer lists
            if r["task"] not in seen:
                seen.add(r["task"])
                groups.append(Group(r["task"], r["task"], r["task"]))
        return groups

    # -- selections ---------------------------------------------------------------------------
    def rows(self, task: str, method: str, bank: str, variant: str = "default") -> list[dict[str, Any]]:
        return self._index.get((task, method, bank, variant), [])

    def values(
        self, task: str, method: str, bank: str, variant: str = "default", field: str = "accuracy"
    ) -> Pairs:
        return {
            (r["profile"], r["seed"]): r[field]
            for r in self.rows(task, method, bank, variant)
            if r.get(field) is not None
        }

    def cells(self, variant: str = "default") -> list[tuple[str, str]]:
        """(method, bank) columns present: baselines first, then each bank's methods."""
        present = {(r["method"], r["bank"]) for r in self.runs if r["variant"] == variant}
        methods = self.config.get("methods") or sorted({m for m, _ in present})
        banks = self.config.get("banks") or ["random", "trained"]
        order = [(m, "none") for m in methods if m in BASELINES]
        order += [(m, b) for b in banks for m in methods if m not in BASELINES]
        return [c for c in order if c in present] + sorted(present - set(order))

    def variants(self) -> list[str]:
        names = [v for v in self.config.get("variants", {}) if any(r["variant"] == v for r in self.runs)]
        return names + sorted({r["variant"] for r in self.runs} - set(names) - {"default"})

    def selection_methods(self) -> list[str]:
        """The methods that read a bank (``hard``, ``units``, ...) that have runs, config order first."""
        present = {r["method"] for r in self.runs} - set(BASELINES)
        order = [m for m in self.config.get("methods", []) if m in present]
        return order + sorted(present - set(order))

    def discriminates(self, task: str) -> bool | None:
        """Whether an adapter beats a plain head here by MIN_ADAPTER_GAIN points (None: not run)."""
        single = scaled(
            difference(self.values(task, "single_adapter", "none"), self.values(task, "head_only", "none"))
        )
        return None if single is None else single.mean >= MIN_ADAPTER_GAIN

    def profiles(self, task: str) -> int:
        return len({r["profile"] for r in self.runs if r["task"] == task})


def group_summary(values: Pairs) -> tuple[Summary | None, int]:
    """Mean over profiles per seed, then mean ± std over the seeds that have every profile;
    also how many seeds were left out as partial."""
    by_seed: dict[int, dict[str, float]] = defaultdict(dict)
    for (profile, seed), v in values.items():
        by_seed[seed][profile] = v
    everyone = {p for p, _ in values}
    complete = [statistics.fmean(v.values()) for s, v in sorted(by_seed.items()) if set(v) == everyone]
    return summarize(complete), len(by_seed) - len(complete)


def difference(a: Pairs, b: Pairs) -> Interval | None:
    """Paired ``a - b`` by (profile, seed), in the same units as the inputs."""
    return t_interval(paired(a, b))


def scaled(i: Interval | None, factor: float = 100.0) -> Interval | None:
    return None if i is None else Interval(i.mean * factor, i.low * factor, i.high * factor, i.n)


@dataclass(frozen=True)
class MaskPays:
    """Section 2 for one task group and bank, in accuracy points."""

    hard_vs_head: Interval | None
    hard_vs_single: Interval | None
    single_vs_head: Interval | None
    gap_closed: float | None  # (hard - head) / (single - head) on the means; None when undefined


def mask_pays(res: Results, task: str, bank: str, variant: str = "default", method: str = "hard") -> MaskPays:
    """``method`` (a kind that reads the bank) against both baselines on ``task``."""
    hard = res.values(task, method, bank, variant)
    head = res.values(task, "head_only", "none")
    single = res.values(task, "single_adapter", "none")
    hh = scaled(difference(hard, head))
    hs = scaled(difference(hard, single))
    sh = scaled(difference(single, head))
    gap = hh.mean / sh.mean if hh and sh and sh.mean > 0 else None
    return MaskPays(hh, hs, sh, gap)


def numeric_means(dicts: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each numeric field over rows; a list counts as the mean of its numbers, nested
    dicts become dotted names. Non-numeric fields are left out."""
    sums: dict[str, list[float]] = defaultdict(list)

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, (bool, int, float)):
            sums[prefix].append(float(value))
        elif isinstance(value, list):
            flat = [x for x in value if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if flat and len(flat) == len(value):
                sums[prefix].append(statistics.fmean(flat))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    for d in dicts:
        walk("", d)
    return {k: statistics.fmean(v) for k, v in sorted(sums.items()) if v}
