"""The report's abstention section, from the ``abstention`` blocks of ``clinc_oos`` runs.

Only (profile, seed) pairs that every method ran are counted, so each column sees the same
domains and seeds. Each number is averaged over the profiles of one seed first, then reported as
mean ± sample std over seeds. The operating point of each score is chosen on the dev splits (the
largest grid point whose in-scope accuracy cost stays within the target for every method) and
then reported on the test splits.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from bench.eval.markdown import table
from xpeft.profiles.abstain import ABSTAIN_SCORES, CLASS_MEAN_SCORES
from xpeft.profiles.constants import SIGN_SCORES
from xpeft.training.train_config import DEFAULT_ABSTAIN_RATE, DEFAULT_ABSTAIN_SCORE

TASK = "clinc_oos"
MAX_DROP = 2.0  # points of in-scope accuracy the rule may cost (the target)
RECALL_PLAIN, RECALL_OOS = 80.0, 90.0  # OOS recall targets without and with OOS examples

Row = dict[str, Any]


def _complete(runs: list[Row]) -> tuple[list[str], dict[tuple[str, int], dict[str, Row]]]:
    """The methods, and the (profile, seed) pairs that all of them ran, each method's row."""
    rows = [r for r in runs if r["task"] == TASK and r["variant"] == "default" and "abstention" in r]
    methods = sorted({r["method"] for r in rows}, key=["head_only", "single_adapter", "hard", "units"].index)
    by: dict[tuple[str, int], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by[(r["profile"], r["seed"])][r["method"]] = r
    return methods, {k: v for k, v in by.items() if set(v) == set(methods)}


def measured(pairs: dict[tuple[str, int], dict[str, Row]], methods: list[str]) -> list[str]:
    """The scores every run measured: runs from before a score existed leave it out."""
    return [
        s
        for s in ABSTAIN_SCORES
        if all(s in rows[m]["abstention"]["scores"] for rows in pairs.values() for m in methods)
    ]


def _summary(pairs: dict[tuple[str, int], dict[str, Row]], method: str, value: Callable[[Row], float]):
    """Mean over profiles per seed, then (mean, std, seeds) over seeds."""
    per_seed: dict[int, list[float]] = defaultdict(list)
    for (_, seed), rows in pairs.items():
        per_seed[seed].append(value(rows[method]["abstention"]))
    means = [statistics.fmean(v) for v in per_seed.values()]
    std = statistics.stdev(means) if len(means) > 1 else 0.0
    return statistics.fmean(means), std, len(means)


def _fmt(s: tuple[float, float, int], signed: bool = False) -> str:
    mean, std, n = s
    return f"{mean:+.2f} ± {std:.2f} [{n}]" if signed else f"{mean:.2f} ± {std:.2f} [{n}]"


def _drop(split: str, point: str, score: str) -> Callable[[Row], float]:
    return lambda a: a["scores"][score]["points"][point][split][0] - a["base_accuracy"][split]


def _at(split: str, point: str, score: str, i: int) -> Callable[[Row], float]:
    """Figure ``i`` (accuracy, recall, precision) of a score's rule at a grid point."""
    return lambda a: a["scores"][score]["points"][point][split][i]


def choose_point(pairs: dict, methods: list[str], score: str, points: list[str]) -> str:
    """The largest grid point whose mean dev cost is within :data:`MAX_DROP` for every method."""
    chosen = points[0]
    for p in points:
        if all(-_summary(pairs, m, _drop("dev", p, score))[0] <= MAX_DROP for m in methods):
            chosen = p
    return chosen


def section(runs: list[Row]) -> list[str]:
    """``## 8. Abstention``: scores, operating points, with and without OOS examples, bytes."""
    out = ['## 8. Abstention: "none of mine"', ""]
    methods, pairs = _complete(runs)
    if not pairs:
        return out + ["No `clinc_oos` run with an abstention block is in the results yet."]
    domains = sorted({p for p, _ in pairs})
    seeds = sorted({s for _, s in pairs})
    any_row = next(iter(pairs.values()))[methods[0]]["abstention"]
    n = any_row["n"]
    points = sorted(any_row["scores"][ABSTAIN_SCORES[0]]["points"], key=float)
    out += [
        f"Each CLINC domain of {', '.join(domains)} is one profile ({len(domains)} domains × seeds "
        f"{', '.join(map(str, seeds))}; every method on the same ones). Training holds out "
        f"{n['held']} of its {n['held'] + n['fit']} training examples to calibrate the rule and "
        f"trains on the rest; the profile is scored on its test split ({n['test']} queries) plus the "
        f"dataset's {n['test_oos']} out-of-scope test queries, and the operating point is chosen on "
        f"its dev split ({n['dev']}) plus {n['dev_oos']} out-of-scope dev queries. In-scope accuracy "
        "counts an abstention as wrong; OOS recall is the share of out-of-scope queries abstained on; "
        "OOS precision the share of abstentions that were out of scope (it depends on the mix, here "
        f"{n['test_oos']} OOS to {n['test']} in scope). Mean ± std over seeds [seeds], in %.",
        "",
        "### Which score separates best (AUROC %, test)",
        "",
        table(
            ["score"] + [f"`{m}`" for m in methods],
            [
                [f"`{s}`"]
                + [_fmt(_summary(pairs, m, lambda a, s=s: a["scores"][s]["auroc"]["test"])) for m in methods]
                for s in measured(pairs, methods)
            ],
        ),
        "",
    ]
    out += _without_oos(pairs, methods, points)
    out += _with_oos(pairs, methods)
    out += _bytes(pairs, methods)
    out += _targets(pairs, methods, points)
    return out


def _without_oos(pairs: dict, methods: list[str], points: list[str]) -> list[str]:
    rows = []
    for s in measured(pairs, methods):
        p = choose_point(pairs, methods, s, points)
        for m in methods:
            rows.append(
                [f"`{s}`", p, f"`{m}`"]
                + [_fmt(_summary(pairs, m, lambda a: a["base_accuracy"]["test"]))]
                + [_fmt(_summary(pairs, m, _drop("test", p, s)), signed=True)]
                + [_fmt(_summary(pairs, m, _at("test", p, s, i))) for i in (1, 2)]
            )
    return [
        "### Calibrated without OOS examples",
        "",
        f"Each score at the largest operating point (`min_confidence`, of {', '.join(points)}) whose "
        f"mean in-scope accuracy cost on dev stays within {MAX_DROP:g} points for every method; "
        "test figures at that point.",
        "",
        table(
            [
                "score",
                "point (dev)",
                "method",
                "in-scope acc, no rule",
                "acc change",
                "OOS recall",
                "OOS precision",
            ],
            rows,
        ),
        "",
    ]


def _with_oos(pairs: dict, methods: list[str]) -> list[str]:
    rows = []
    for s in measured(pairs, methods):
        for m in methods:
            rows.append(
                [
                    f"`{s}`",
                    f"`{m}`",
                    f"{_summary(pairs, m, lambda a, s=s: a['scores'][s]['oos_point'])[0]:.3f}",
                ]
                + [
                    _fmt(
                        _summary(
                            pairs,
                            m,
                            lambda a, s=s: a["scores"][s]["oos"]["test"][0] - a["base_accuracy"]["test"],
                        ),
                        True,
                    )
                ]
                + [
                    _fmt(_summary(pairs, m, lambda a, s=s, i=i: a["scores"][s]["oos"]["test"][i]))
                    for i in (1, 2)
                ]
            )
    return [
        "### Sharpened with OOS examples",
        "",
        "The same rules with the operating point picked on the dataset's 100 out-of-scope training "
        "queries (given at training time, as a customer would label them): the point that catches "
        "the most of them while costing at most 2% of the held-out in-scope examples.",
        "",
        table(["score", "method", "mean point", "acc change", "OOS recall", "OOS precision"], rows),
        "",
    ]


def _bytes(pairs: dict, methods: list[str]) -> list[str]:
    rows = []
    for s in measured(pairs, methods):
        added = [r[m]["abstention"]["scores"][s]["file_bytes_added"] for r in pairs.values() for m in methods]
        labels = sorted({r[m]["n_labels"] for r in pairs.values() for m in methods})
        note = "no class means"
        if s in CLASS_MEAN_SCORES:
            note = (
                "class-mean signs (C × d bits) included"
                if s in SIGN_SCORES
                else "class means (C × d fp16) included"
            )
        rows.append([f"`{s}`", f"{statistics.median(added):.0f}", f"{min(added)}–{max(added)}", note])
    return [
        "### Bytes the rule adds to a profile file",
        "",
        f"Measured as the `.xpm` size with the rule minus without it (profiles of {', '.join(map(str, labels))} labels).",
        "",
        table(["score", "median bytes", "range", "what it stores"], rows),
        "",
    ]


def _targets(pairs: dict, methods: list[str], points: list[str]) -> list[str]:
    s = DEFAULT_ABSTAIN_SCORE
    if any(s not in rows[m]["abstention"]["scores"] for rows in pairs.values() for m in methods):
        return [
            "### Targets",
            "",
            f"These runs predate the shipped score `{s}` and its conformal operating point: "
            "[ABSTENTION.md](ABSTENTION.md) measures them, on every CLINC domain and with near misses.",
        ]
    shipped, dev = str(DEFAULT_ABSTAIN_RATE), choose_point(pairs, methods, s, points)
    rows = []
    for m in methods:
        oos_drop = _summary(
            pairs, m, lambda a: a["scores"][s]["oos"]["test"][0] - a["base_accuracy"]["test"]
        )[0]
        oos_recall = _summary(pairs, m, _oos_recall(s))[0]
        met_oos = oos_recall >= RECALL_OOS and -oos_drop <= MAX_DROP
        row = [f"`{m}`"]
        for p in dict.fromkeys([shipped, dev]):
            if p not in points:
                row.append("not measured")
                continue
            drop = _summary(pairs, m, _drop("test", p, s))[0]
            recall = _summary(pairs, m, _at("test", p, s, 1))[0]
            met = recall >= RECALL_PLAIN and -drop <= MAX_DROP
            row.append(f"{recall:.1f}% at {drop:+.2f} → {'met' if met else 'not met'}")
        rows.append(row + [f"{oos_recall:.1f}% at {oos_drop:+.2f} → {'met' if met_oos else 'not met'}"])
    dev_costs = [-_summary(pairs, m, _drop("dev", dev, s))[0] for m in methods]
    heads = [f"without OOS examples, point {shipped} (shipped)"]
    if dev != shipped:
        heads.append(f"without OOS examples, point {dev} (dev choice)")
    return [
        "### Targets",
        "",
        f"The shipped default score `{s}` at the shipped operating point {shipped}"
        + (f" and at the point the dev splits choose, {dev}" if dev != shipped else "")
        + (
            f" (its dev cost: {min(dev_costs):.2f} to {max(dev_costs):.2f} points, the largest within the bound)"
            if dev != shipped
            else ""
        )
        + f". Targets: without OOS examples OOS recall ≥ {RECALL_PLAIN:g}% with in-scope accuracy "
        f"down by at most {MAX_DROP:g} points; with OOS examples OOS recall ≥ {RECALL_OOS:g}% at the "
        "same cost. Test splits, mean over domains and seeds: OOS recall at the change in in-scope "
        "accuracy (points).",
        "",
        table(["method", *heads, "with OOS examples (picked point)"], rows),
    ]


def _oos_recall(score: str) -> Callable[[Row], float]:
    return lambda a: a["scores"][score]["oos"]["test"][1]
