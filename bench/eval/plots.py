"""The report's two plots, drawn from the results alone (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.eval.analysis import Results, group_summary

CURVE_METHODS = (
    ("head_only", "none"),
    ("single_adapter", "none"),
    ("hard", "random"),
    ("hard", "trained"),
    ("units", "random"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: stable bytes


def curve_runs(res: Results) -> tuple[str, list[dict[str, Any]]] | None:
    """The first task (config order) with hard, head_only and single_adapter runs of one profile
    and seed (the smallest seed, the first profile): its runs, one per method/bank."""
    for g in res.groups:
        rows = [r for m, b in CURVE_METHODS for r in res.rows(g.name, m, b)]
        keys = sorted({(r["seed"], r["profile"]) for r in rows})
        for seed, profile in keys:
            chosen = [r for r in rows if (r["seed"], r["profile"]) == (seed, profile) and r.get("loss_curve")]
            if {"hard", "head_only", "single_adapter"} <= {r["method"] for r in chosen}:
                return g.title + (
                    "" if profile == g.name else f", profile {profile}"
                ) + f", seed {seed}", chosen
    return None


def plot_curves(res: Results, path: Path) -> str | None:
    found = curve_runs(res)
    if found is None:
        return None
    title, rows = found
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        steps, losses = zip(*r["loss_curve"], strict=True)
        label = r["method"] + ("" if r["bank"] == "none" else f" ({r['bank']} bank)")
        ax.plot(steps, losses, label=label, linewidth=1.4)
    ax.set(xlabel="training step", ylabel="training loss (batch)", title=f"Training loss: {title}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return title


def plot_main(res: Results, path: Path) -> bool:
    """Grouped bars of the main table: mean accuracy over seeds, error bars one sample std."""
    cells = res.cells()
    groups = [g for g in res.groups if any(res.rows(g.name, m, b) for m, b in cells)]
    if not groups or not cells:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(groups)), 4.2))
    width = 0.8 / len(cells)
    for i, (method, bank) in enumerate(cells):
        means, stds, xs = [], [], []
        for j, g in enumerate(groups):
            summary, _ = group_summary(res.values(g.name, method, bank))
            if summary is not None:
                xs.append(j + (i - (len(cells) - 1) / 2) * width)
                means.append(summary.mean * 100)
                stds.append(summary.std * 100)
        label = method + ("" if bank == "none" else f" ({bank})")
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=label)
    ax.set_xticks(range(len(groups)), [g.title for g in groups], rotation=15, ha="right")
    ax.set(ylabel="dev accuracy %", title="Accuracy by task group (mean over seeds, ± sample std)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(cells)))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True
