"""The README's quality table: what a profile gains over ``head_only`` and costs against
``single_adapter``, in accuracy and bytes, generated from the benchmark's results file.

``python -m bench.eval report ... --readme README.md`` rewrites the README's ``summary`` block.
"""

from __future__ import annotations

import statistics

from bench.eval.analysis import Results, group_summary, mask_pays
from bench.eval.markdown import NOT_RUN, interval, table


def _acc(res: Results, task: str, method: str, bank: str, variant: str = "default") -> str:
    summary, _ = group_summary(res.values(task, method, bank, variant))
    return NOT_RUN if summary is None else f"{summary.mean * 100:.1f}"


def _bytes(res: Results, method: str, labels: int) -> int | None:
    sizes = [r["bytes"]["total"] for r in res.runs if r["method"] == method and r["n_labels"] == labels]
    return int(statistics.median(sizes)) if sizes else None


def block(
    res: Results, results_path: str, command: str, doc: str = "docs/EVALUATION.md", shipped: str | None = None
) -> str:
    """``shipped``: the variant that equals the library's current defaults, shown as its own column."""
    banks = [
        b for b in ("random", "trained") if any(r["method"] == "hard" and r["bank"] == b for r in res.runs)
    ]
    header = ["task group", "`head_only`", "`single_adapter`"]
    header += [f"`hard` ({b} bank)" for b in banks]
    if shipped:
        header.append(f"`hard`, shipped defaults (variant `{shipped}`, random bank)")
    header += [f"`hard` − `head_only` ({b} bank), 95% interval" for b in banks] + ["gap closed (random bank)"]
    if shipped:
        header += ["shipped − `head_only`, 95% interval", "gap closed (shipped)"]
    rows = []
    for g in res.groups:
        row = [g.title, _acc(res, g.name, "head_only", "none"), _acc(res, g.name, "single_adapter", "none")]
        row += [_acc(res, g.name, "hard", b) for b in banks]
        if shipped:
            row.append(_acc(res, g.name, "hard", "random", shipped))
        pays = {b: mask_pays(res, g.name, b) for b in banks}
        row += [interval(pays[b].hard_vs_head) for b in banks]
        gap = pays["random"].gap_closed if "random" in pays else None
        row.append(f"{gap:.0%}" if gap is not None else "—")
        if shipped:
            mine = mask_pays(res, g.name, "random", shipped)
            row += [
                interval(mine.hard_vs_head),
                f"{mine.gap_closed:.0%}" if mine.gap_closed is not None else "—",
            ]
        rows.append(row)
    sizes = []
    for labels in sorted({r["n_labels"] for r in res.runs}):
        hard, single = _bytes(res, "hard", labels), _bytes(res, "single_adapter", labels)
        if hard and single:
            sizes.append(
                f"{labels} labels: {hard:,} bytes against {single:,} ({single / hard:,.0f}× smaller)"
            )
    return "\n".join(
        [
            f"Dev accuracy % (mean over seeds; groups averaged over their profiles), from `{results_path}` "
            f"by `{command}`; details, intervals and the research variants in [{doc}]({doc}).",
            "",
            table(header, rows),
            "",
            "Median `.xpm` size of a `hard` profile against a `single_adapter` one: " + "; ".join(sizes) + "."
            if sizes
            else "",
        ]
    )
