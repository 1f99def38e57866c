"""The project's quality targets for the shipped default, each with a verdict and a margin.

The shipped default is one (method, variant) on the random bank: what ``TrainConfig()`` trains.
Accuracy targets are computed on the groups that *discriminate*, where ``single_adapter`` beats
``head_only`` by at least 2 points; elsewhere a better method cannot show.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.eval.analysis import MIN_ADAPTER_GAIN, Results, group_summary, mask_pays

MIN_GAIN = 3.0  # points over head_only, on the mean of the discriminating groups
MIN_GAP_CLOSED = 0.80
MAX_2LABEL_BYTES = 4096  # a whole 2-label .xpm
MAX_SELECTION_BYTES = 4096  # masks + per-profile extras, the head apart


@dataclass(frozen=True)
class Shipped:
    """The method and variant that equal the library's defaults."""

    method: str = "hard"
    variant: str = "default"

    @property
    def name(self) -> str:
        return f"`{self.method}`" + (f" (variant `{self.variant}`)" if self.variant != "default" else "")


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    verdict: str  # "met", "missed", "not run", "not applicable", "no target set"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def adapter_groups(res: Results, shipped: Shipped) -> list[Target]:
    """(a) on the discriminating groups, the shipped default adds >= 3 points over ``head_only``
    on their mean (interval above 0 on each) and closes >= 80% of the gap to ``single_adapter``."""
    s = shipped.name
    helped = [
        (g, p.hard_vs_head, p.single_vs_head)
        for g in res.groups
        for p in [mask_pays(res, g.name, "random", shipped.variant, shipped.method)]
        if p.single_vs_head is not None and p.single_vs_head.mean >= MIN_ADAPTER_GAIN
    ]
    complete = [(g, hh, sh) for g, hh, sh in helped if hh is not None]
    name = f"(a) where an adapter helps (≥ {MIN_ADAPTER_GAIN:g} pts), {s} − `head_only`"
    if not complete:
        if helped:
            return [Target(name, f"{s} not run on " + ", ".join(g.title for g, _, _ in helped), "not run")]
        return [
            Target(name, "no task group where `single_adapter` beats `head_only` by 2 pts", "not applicable")
        ]
    titles = ", ".join(g.title for g, _, _ in complete)
    gain = statistics.fmean(hh.mean for _, hh, _ in complete)
    adapter = statistics.fmean(sh.mean for _, _, sh in complete)
    above = [g.title for g, hh, _ in complete if hh.n >= 2 and hh.low > 0]
    closed = gain / adapter
    return [
        Target(
            f"{name} ≥ +{MIN_GAIN:g} pts on their mean",
            f"{gain:+.2f} pts over {titles} ({gain - MIN_GAIN:+.2f} vs target)",
            _verdict(gain >= MIN_GAIN),
        ),
        Target(
            f"(a) 95% interval of {s} − `head_only` above 0 on each such group",
            f"{len(above)} of {len(complete)} ({', '.join(above) or 'none'})",
            _verdict(len(above) == len(complete)),
        ),
        Target(
            f"(a) {s} closes ≥ {MIN_GAP_CLOSED:.0%} of the head_only → single_adapter gap on their mean",
            f"{closed:.0%} ({(closed - MIN_GAP_CLOSED) * 100:+.0f} pts vs target; adapter gap "
            f"{adapter:+.2f} pts)",
            _verdict(closed >= MIN_GAP_CLOSED),
        ),
    ]


def fewshot(res: Results, shipped: Shipped) -> list[Target]:
    """(b) few-shot groups: the shipped default at least as accurate as the better baseline."""
    out = []
    for g in (g for g in res.groups if g.kind == "clinc_fewshot"):
        mine, _ = group_summary(res.values(g.name, shipped.method, "random", shipped.variant))
        base = [group_summary(res.values(g.name, m, "none"))[0] for m in ("head_only", "single_adapter")]
        name = f"(b) {g.title}: {shipped.name} ≥ max(head_only, single_adapter)"
        if mine is None or any(b is None for b in base):
            out.append(Target(name, "not run", "not run"))
            continue
        best = max(b.mean for b in base if b is not None)
        margin = (mine.mean - best) * 100
        out.append(
            Target(
                name,
                f"{mine.mean * 100:.2f}% vs {best * 100:.2f}% ({margin:+.2f} pts)",
                _verdict(margin >= 0),
            )
        )
    return out


def _at_most(name: str, sizes: list[int], limit: int) -> Target:
    if not sizes:
        return Target(name, "not run", "not run")
    return Target(
        name, f"largest {max(sizes):,} B ({limit - max(sizes):+,} B to spare)", _verdict(max(sizes) <= limit)
    )


def sizes(res: Results, shipped: Shipped, shipped_sizes: dict | None = None) -> list[Target]:
    """(c) a 2-label profile ≤ 4 KB whole; masks + per-profile extras ≤ 4 KB (the head apart).
    With ``shipped_sizes`` (``python -m bench.eval sizes``) the whole file is the one
    ``xpeft train`` writes by default, abstention rule included; else the runs' (rule off)."""
    mine = [r for r in res.runs if r["method"] == shipped.method and r["variant"] == shipped.variant]
    two = [r["bytes"]["total"] for r in mine if r["n_labels"] == 2]
    whole = "whole .xpm, abstention off as the runs trained"
    default = (
        [] if shipped_sizes is None else [r for r in shipped_sizes["sizes"] if r["method"] == shipped.method]
    )
    if shipped.variant == "default" and any(row["labels"] == 2 for row in default):
        two = [row["bytes"]["total"] for row in default if row["labels"] == 2]
        whole = "whole .xpm as `xpeft train` writes it, abstention rule included"
    selection = [r["bytes"]["selection"] + r["bytes"]["extras"] for r in mine]
    return [
        _at_most(
            f"(c) {shipped.name} profile of a 2-label task ≤ {MAX_2LABEL_BYTES:,} B ({whole})",
            two,
            MAX_2LABEL_BYTES,
        ),
        _at_most(
            f"(c) every {shipped.name} profile ≤ {MAX_SELECTION_BYTES:,} B of masks + per-profile extras (head apart)",
            selection,
            MAX_SELECTION_BYTES,
        ),
    ]


def train_time(res: Results, shipped: Shipped) -> list[Target]:
    """(d) training time of the shipped default against a baseline the config records under
    ``targets.train_time``: ``{"baseline_method": m}`` or ``{"baseline_seconds": {task: s}}``,
    with an optional ``max_ratio``. Without it the ratio is reported and no verdict is given."""
    spec: dict[str, Any] = res.config.get("targets", {}).get("train_time") or {}
    method = spec.get("baseline_method", "single_adapter")
    fixed: dict[str, float] = spec.get("baseline_seconds") or {}
    ratios, parts = [], []
    for g in res.groups:
        mine = [r["train_seconds"] for r in res.rows(g.name, shipped.method, "random", shipped.variant)]
        base = fixed.get(g.name)
        if base is None and not fixed:
            rows = res.rows(g.name, method, "none")
            base = statistics.fmean(r["train_seconds"] for r in rows) if rows else None
        if mine and base:
            ratio = statistics.fmean(mine) / base
            ratios.append(ratio)
            parts.append(f"{g.title} {ratio:.2f}×")
    against = "the recorded baseline seconds" if fixed else f"`{method}`"
    name = f"(d) {shipped.name} (random bank) training time against {against}"
    if not ratios:
        return [Target(name, "not run", "not run")]
    limit = spec.get("max_ratio")
    if limit is None:
        return [
            Target(
                name + " (no limit set in the config's `targets.train_time`)",
                "; ".join(parts),
                "no target set",
            )
        ]
    worst = max(ratios)
    return [
        Target(f"{name} ≤ {limit:g}×", f"{'; '.join(parts)} (worst {worst:.2f}×)", _verdict(worst <= limit))
    ]


def all_targets(
    res: Results, shipped: Shipped | None = None, shipped_sizes: dict | None = None
) -> list[Target]:
    shipped = shipped or Shipped()
    return (
        adapter_groups(res, shipped)
        + fewshot(res, shipped)
        + sizes(res, shipped, shipped_sizes)
        + train_time(res, shipped)
    )
