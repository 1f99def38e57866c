"""The project's quality targets, each computed from the results with a verdict and a margin."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.eval.analysis import Results, group_summary, mask_pays

MIN_ADAPTER_GAIN = 2.0  # points: groups where an adapter helps at all
MIN_HARD_GAIN = 3.0  # points over head_only, on the mean of those groups
MIN_GAP_CLOSED = 0.70
MAX_HARD_2LABEL_BYTES = 2048
MAX_SELECTION_BYTES = 4096


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    verdict: str  # "met", "missed", "not run", "not applicable", "no target set"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def _banks(res: Results) -> list[str]:
    return [
        b for b in ("random", "trained") if any(r["bank"] == b and r["method"] == "hard" for r in res.runs)
    ]


def adapter_groups(res: Results, bank: str) -> list[Target]:
    """(a) where ``single_adapter`` beats ``head_only`` by >= 2 points, ``hard`` must add >= 3
    points over ``head_only`` on their mean (interval above 0 on each) and close >= 70% of the gap."""
    helped = [
        (g, p.hard_vs_head, p.single_vs_head)
        for g in res.groups
        for p in [mask_pays(res, g.name, bank)]
        if p.single_vs_head is not None and p.single_vs_head.mean >= MIN_ADAPTER_GAIN
    ]
    complete = [(g, hh, sh) for g, hh, sh in helped if hh is not None]
    name = f"(a) {bank} bank: where an adapter helps (≥ {MIN_ADAPTER_GAIN:g} pts), `hard − head_only`"
    if not complete:
        if helped:
            return [Target(name, "`hard` not run on " + ", ".join(g.title for g, _, _ in helped), "not run")]
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
            f"{name} ≥ +{MIN_HARD_GAIN:g} pts on their mean",
            f"{gain:+.2f} pts over {titles} ({gain - MIN_HARD_GAIN:+.2f} vs target)",
            _verdict(gain >= MIN_HARD_GAIN),
        ),
        Target(
            f"(a) {bank} bank: 95% interval of `hard − head_only` above 0 on each such group",
            f"{len(above)} of {len(complete)} ({', '.join(above) or 'none'})",
            _verdict(len(above) == len(complete)),
        ),
        Target(
            f"(a) {bank} bank: `hard` closes ≥ {MIN_GAP_CLOSED:.0%} of the head_only → single_adapter gap",
            f"{closed:.0%} ({(closed - MIN_GAP_CLOSED) * 100:+.0f} pts vs target)",
            _verdict(closed >= MIN_GAP_CLOSED),
        ),
    ]


def fewshot(res: Results, bank: str) -> list[Target]:
    """(b) few-shot groups: ``hard`` at least as accurate as the better baseline."""
    out = []
    for g in (g for g in res.groups if g.kind == "clinc_fewshot"):
        hard, _ = group_summary(res.values(g.name, "hard", bank))
        base = [group_summary(res.values(g.name, m, "none"))[0] for m in ("head_only", "single_adapter")]
        name = f"(b) {bank} bank, {g.title}: `hard` ≥ max(head_only, single_adapter)"
        if hard is None or any(b is None for b in base):
            out.append(Target(name, "not run", "not run"))
            continue
        best = max(b.mean for b in base if b is not None)
        margin = (hard.mean - best) * 100
        out.append(
            Target(
                name,
                f"{hard.mean * 100:.2f}% vs {best * 100:.2f}% ({margin:+.2f} pts)",
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


def sizes(res: Results) -> list[Target]:
    """(c) a hard 2-label profile ≤ 2 KB; every hard profile ≤ 4 KB of masks + extras."""
    hard = [r for r in res.runs if r["method"] == "hard" and r["variant"] == "default"]
    two = [r["bytes"]["total"] for r in hard if r["n_labels"] == 2]
    selection = [r["bytes"]["selection"] + r["bytes"]["extras"] for r in hard]
    return [
        _at_most(
            f"(c) `hard` profile of a 2-label task ≤ {MAX_HARD_2LABEL_BYTES:,} B (whole .xpm)",
            two,
            MAX_HARD_2LABEL_BYTES,
        ),
        _at_most(
            f"(c) every `hard` profile ≤ {MAX_SELECTION_BYTES:,} B of masks + per-profile extras (head apart)",
            selection,
            MAX_SELECTION_BYTES,
        ),
    ]


def train_time(res: Results) -> list[Target]:
    """(d) training time of ``hard`` against a baseline the config records under
    ``targets.train_time``: ``{"baseline_method": m}`` or ``{"baseline_seconds": {task: s}}``,
    with an optional ``max_ratio``. Without it the ratio is reported and no verdict is given."""
    spec: dict[str, Any] = res.config.get("targets", {}).get("train_time") or {}
    method = spec.get("baseline_method", "single_adapter")
    fixed: dict[str, float] = spec.get("baseline_seconds") or {}
    ratios, parts = [], []
    for g in res.groups:
        hard = [r["train_seconds"] for r in res.rows(g.name, "hard", "random")]
        base = fixed.get(g.name)
        if base is None and not fixed:
            rows = res.rows(g.name, method, "none")
            base = statistics.fmean(r["train_seconds"] for r in rows) if rows else None
        if hard and base:
            ratio = statistics.fmean(hard) / base
            ratios.append(ratio)
            parts.append(f"{g.title} {ratio:.2f}×")
    against = "the recorded baseline seconds" if fixed else f"`{method}`"
    name = f"(d) `hard` (random bank) training time against {against}"
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


def all_targets(res: Results) -> list[Target]:
    out = []
    for bank in _banks(res):
        out += adapter_groups(res, bank) + fewshot(res, bank)
    return out + sizes(res) + train_time(res)
