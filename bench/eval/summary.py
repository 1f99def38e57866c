"""The README's quality table: what a profile gains over ``head_only`` and costs against
``single_adapter``, in accuracy and bytes, generated from the benchmark's results file.

``python -m bench.eval report ... --readme README.md`` rewrites the README's ``summary`` block.
"""

from __future__ import annotations

from bench.eval import sizes
from bench.eval.analysis import Results, group_summary, mask_pays
from bench.eval.markdown import NOT_RUN, interval, table
from bench.eval.targets import Shipped


def _acc(res: Results, task: str, method: str, bank: str, variant: str = "default") -> str:
    summary, _ = group_summary(res.values(task, method, bank, variant))
    return NOT_RUN if summary is None else f"{summary.mean * 100:.1f}"


def block(
    res: Results,
    results_path: str,
    command: str,
    doc: str = "docs/EVALUATION.md",
    shipped: Shipped | None = None,
    shipped_sizes: dict | None = None,
    sizes_path: str = "bench/eval/results/sizes.json",
) -> str:
    """``shipped``: the method and variant that equal the library's current defaults;
    ``shipped_sizes``: ``python -m bench.eval sizes``'s measurement of the files they write."""
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
    return "\n".join(
        [
            f"Accuracy % on each task's scored split (mean over seeds; groups averaged over their "
            f"profiles), from `{results_path}` by `{command}`; details, intervals and the research "
            f"variants in [{doc}]({doc}).",
            "",
            table(header, rows),
            "",
            sizes.readme_line(shipped_sizes, sizes_path, shipped.method),
        ]
    )
