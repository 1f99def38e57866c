"""The README's quality table: what a profile gains over ``head_only`` and costs against
``single_adapter``, in accuracy and bytes, generated from the benchmark's results file.

``python -m bench.eval report ... --readme README.md`` rewrites the README's ``summary`` block.
"""

from __future__ import annotations

import statistics

from bench.eval.analysis import Results, group_summary, mask_pays
from bench.eval.markdown import NOT_RUN, interval, table
from bench.eval.targets import Shipped


def _acc(res: Results, task: str, method: str, bank: str, variant: str = "default") -> str:
    summary, _ = group_summary(res.values(task, method, bank, variant))
    return NOT_RUN if summary is None else f"{summary.mean * 100:.1f}"


def _bytes(res: Results, shipped: Shipped, labels: int) -> int | None:
    sizes = [
        r["bytes"]["total"]
        for r in res.runs
        if (r["method"], r["variant"], r["n_labels"]) == (shipped.method, shipped.variant, labels)
    ]
    return int(statistics.median(sizes)) if sizes else None


def block(
    res: Results,
    results_path: str,
    command: str,
    doc: str = "docs/EVALUATION.md",
    shipped: Shipped | None = None,
) -> str:
    """``shipped``: the method and variant that equal the library's current defaults."""
    shipped = shipped or Shipped()
    paper = shipped.method != "hard" or shipped.variant != "default"
    header = ["task group", "`head_only`", "`single_adapter`"]
    if paper:
        header.append("`hard`, the paper's masks (random bank)")
    header += [
        f"{shipped.name}, shipped defaults (random bank)",
        "shipped − `head_only`, 95% interval",
        "gap closed (shipped)",
        "adapter helps ≥ 2 pts",
    ]
    rows = []
    for g in res.groups:
        row = [g.title, _acc(res, g.name, "head_only", "none"), _acc(res, g.name, "single_adapter", "none")]
        if paper:
            row.append(_acc(res, g.name, "hard", "random"))
        mine = mask_pays(res, g.name, "random", shipped.variant, shipped.method)
        helps = res.discriminates(g.name)
        row += [
            _acc(res, g.name, shipped.method, "random", shipped.variant),
            interval(mine.hard_vs_head),
            f"{mine.gap_closed:.0%}" if mine.gap_closed is not None else "—",
            NOT_RUN if helps is None else "yes" if helps else "no",
        ]
        rows.append(row)
    sizes = []
    for labels in sorted({r["n_labels"] for r in res.runs}):
        mine_b, single = _bytes(res, shipped, labels), _bytes(res, Shipped("single_adapter"), labels)
        if mine_b and single:
            sizes.append(
                f"{labels} labels: {mine_b:,} bytes against {single:,} ({single / mine_b:,.0f}× smaller)"
            )
    return "\n".join(
        [
            f"Accuracy % on each task's scored split (mean over seeds; groups averaged over their "
            f"profiles), from `{results_path}` by `{command}`; details, intervals and the research "
            f"variants in [{doc}]({doc}).",
            "",
            table(header, rows),
            "",
            f"Median `.xpm` size of a shipped {shipped.name} profile against a `single_adapter` one: "
            + "; ".join(sizes)
            + "."
            if sizes
            else "",
        ]
    )
