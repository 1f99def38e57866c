"""``docs/EVALUATION.md`` and its plots, rendered from a suite results file and nothing else.

Only rows of the plan of the latest session's config count, so a results file that holds runs of
an older config never mixes them into the tables. Every number in the page comes from a row.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xpeft.profiles import format as xpm
from xpeft.profiles.masks import khot
from xpeft.profiles.profile import Profile, ProfileKind
from xpeft.profiles.suite import (
    SuiteConfig,
    SuiteError,
    choose_hyperparameters,
    grid_specs,
    parse_config,
    profile_sizes,
    read_results,
    tune_specs,
)

METHOD_ORDER = ("head_only", "single_adapter", "soft", "hard")
TARGET_GAP_SINGLE = 1.5  # hard within this many points of single_adapter
TARGET_OVER_HEAD = 3.0  # hard at least this many points above head_only
TARGET_RANDOM_VS_TRAINED = 3.0  # random bank within this many points of the trained bank
TARGET_MASK_RATIO = 10_000  # masks alone this many times smaller than one fp32 adapter


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def pct(self) -> str:
        """Mean ± std in accuracy points, and the number of seeds."""
        if self.n == 0:
            return "—"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} ({self.n})"


@dataclass
class Results:
    """The rows of one results file that belong to the plan of its latest config."""

    config: SuiteConfig
    sessions: list[dict]
    ends: list[dict]
    runs: list[dict]
    tune: list[dict]
    banks: list[dict]
    planned: list[str]  # run ids of the plan, in order
    missing: list[str]

    @classmethod
    def load(cls, path: str | Path) -> Results:
        rows = read_results(path)
        starts = [r for r in rows if r.get("type") == "session" and r.get("event") == "start"]
        if not starts:
            raise SuiteError("bad_results", f"{path} holds no session: is it a suite results file?")
        config = parse_config(starts[-1]["config"])
        done = {r["key"]: r for r in rows if r.get("type") in ("run", "tune") and "key" in r}
        tune = tune_specs(config)
        chosen, _ = choose_hyperparameters(config, done)
        grid = grid_specs(config, chosen)
        plan = {s.key(): s for s in tune + grid}
        runs = [done[s.key()] | {"groups": list(s.groups)} for s in grid if s.key() in done]
        tune_rows = [done[s.key()] for s in tune if s.key() in done]
        sigs = {s.bank_sig for s in grid if s.bank == "trained"}
        banks = list({r["sig"]: r for r in rows if r.get("type") == "bank" and r.get("sig") in sigs}.values())
        missing = [s.run_id for k, s in plan.items() if k not in done]
        ends = [r for r in rows if r.get("type") == "session" and r.get("event") == "end"]
        return cls(config, starts, ends, runs, tune_rows, banks, [s.run_id for s in plan.values()], missing)

    def title(self, task: str) -> str:
        return self.config.tasks[task].title or task

    def select(self, group: str, **where) -> list[dict]:
        return [r for r in self.runs if group in r["groups"] and all(r.get(k) == v for k, v in where.items())]

    def accuracy(self, group: str, **where) -> Stat:
        return Stat([r["accuracy"] for r in self.select(group, **where)])


# -- plots ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _baselines(ax, res: Results, task: str) -> None:
    for method, style in (("head_only", ":"), ("single_adapter", "--")):
        stat = res.accuracy("main", task=task, method=method)
        if stat.n:
            ax.axhline(
                100 * stat.mean,
                color="grey",
                linestyle=style,
                linewidth=1,
                label=f"{method} (main, {stat.n} seeds)",
            )


def plot_sweeps(res: Results, img_dir: Path) -> dict[str, str]:
    """Accuracy against N and against k (hard masks; soft against N)."""
    s = res.config.sweeps
    if s is None:
        return {}
    rows = res.select("sweep", task=s.task, bank=s.bank)
    if not rows:
        return {}
    plt = _pyplot()
    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fraction in s.k_fractions:
        points = defaultdict(list)
        for r in rows:
            if r["method"] == "hard" and r["n"] and r["k"] == max(1, min(r["n"], round(r["n"] * fraction))):
                points[r["n"]].append(r["accuracy"])
        _errorline(ax, points, f"hard, k = N·{fraction:g}", marker="o")
    soft = defaultdict(list)
    for r in rows:
        if r["method"] == "soft":
            soft[r["n"]].append(r["accuracy"])
    _errorline(ax, soft, "soft", marker="s")
    _finish_sweep(ax, res, "adapters per layer in the bank, N", list(s.n), "N")
    out["n"] = _save(fig, img_dir / "eval_accuracy_vs_n.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in s.n:
        points = defaultdict(list)
        for r in rows:
            if r["method"] == "hard" and r["n"] == n:
                points[r["k"]].append(r["accuracy"])
        _errorline(ax, points, f"hard, N = {n}", marker="o")
    _finish_sweep(
        ax, res, "adapters kept per layer, k", sorted({r["k"] for r in rows if r["method"] == "hard"}), "k"
    )
    out["k"] = _save(fig, img_dir / "eval_accuracy_vs_k.png")
    plt.close(fig)
    return out


def _finish_sweep(ax, res: Results, xlabel: str, ticks: list[int], name: str) -> None:
    """Baselines, log-2 axis with the swept values as ticks, labels, legend."""
    s = res.config.sweeps
    assert s is not None
    _baselines(ax, res, s.task)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{res.title(s.task)} dev accuracy (%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_title(f"Accuracy against {name} ({s.bank} bank; mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.figure.tight_layout()


def _errorline(ax, points: dict, label: str, marker: str) -> None:
    if not points:
        return
    xs = sorted(points)
    stats = [Stat(points[x]) for x in xs]
    ax.errorbar(
        xs,
        [100 * s.mean for s in stats],
        yerr=[100 * s.std for s in stats],
        marker=marker,
        capsize=3,
        label=label,
    )


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(res: Results, img_dir: Path) -> dict[str, str]:
    """Soft against hard: training loss and dev accuracy per step, one figure per task."""
    out = {}
    for task in res.config.main.tasks:
        rows = [r for r in res.select("curves", task=task) if r["method"] in ("soft", "hard")]
        if not rows:
            continue
        plt = _pyplot()
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
        for r in sorted(rows, key=lambda r: r["method"]):
            curve = r["curve"]
            steps = [p["step"] for p in curve]
            losses = [p["loss"] for p in curve]
            window = max(1, len(losses) // 20)
            label = r["method"] + (f" (k={r['k']})" if r["method"] == "hard" else "")
            (line,) = ax_loss.plot(steps, _smooth(losses, window), label=f"{label}, moving mean of {window}")
            ax_loss.plot(steps, losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
            evals = [(p["step"], p["eval_accuracy"]) for p in curve if "eval_accuracy" in p]
            if evals:
                ax_acc.plot(
                    [s for s, _ in evals],
                    [100 * a for _, a in evals],
                    marker=".",
                    color=line.get_color(),
                    label=label,
                )
        size = rows[0].get("curve_dev_size") or "all"
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss (batch)")
        ax_loss.legend(fontsize=8)
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel(f"dev accuracy (%), {size} dev examples")
        ax_acc.legend(fontsize=8)
        fig.suptitle(
            f"{res.title(task)}: soft against hard masks ({rows[0]['bank']} bank N={rows[0]['n']}, "
            f"seed {rows[0]['seed']})"
        )
        fig.tight_layout()
        out[task] = _save(fig, img_dir / f"eval_curves_{task}.png")
        plt.close(fig)
    return out


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return str(path)


# -- tables --------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    return f"{n:,.0f}"


def _ratio(x: float) -> str:
    return f"{x:,.0f}×" if x >= 10 else f"{x:,.1f}×"


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _single_sizes(res: Results, task: str) -> tuple[float, float] | None:
    """(fp16, fp32) bytes of a single_adapter profile: measured, and with the adapter in fp32."""
    rows = res.select("main", task=task, method="single_adapter")
    if not rows:
        return None
    fp16 = _median([r["profile_bytes"] for r in rows])
    return fp16, fp16 + _median([r["adapter_fp16_bytes"] for r in rows])


def main_table(res: Results) -> str:
    m = res.config.main
    tasks = list(m.tasks)
    header = ["method", "bank"] + [f"{res.title(t)} accuracy % (seeds)" for t in tasks]
    first = tasks[0]
    header += [
        f"profile bytes ({res.title(first)})",
        "× smaller than single_adapter, fp32 adapter",
        "× smaller, fp16 adapter",
    ]
    single = _single_sizes(res, first)
    rows = []
    for method in [x for x in METHOD_ORDER if x in m.methods]:
        banks = ["none"] if method in ("head_only", "single_adapter") else [b for b in m.banks]
        for bank in banks:
            cells: list[object] = [f"`{method}`", bank if bank != "none" else "—"]
            for task in tasks:
                cells.append(res.accuracy("main", task=task, method=method, bank=bank).pct())
            sizes = [r["profile_bytes"] for r in res.select("main", task=first, method=method, bank=bank)]
            if sizes and single:
                b = _median(sizes)
                cells += [_bytes(b), _ratio(single[1] / b), _ratio(single[0] / b)]
            else:
                cells += ["—", "—", "—"]
            rows.append(cells)
    return _table(header, rows)


def detail_table(res: Results) -> str:
    """Per task and method: F1, MCC, train accuracy at the end, seconds."""
    rows = []
    for task in res.config.main.tasks:
        for method in [x for x in METHOD_ORDER if x in res.config.main.methods]:
            for bank in (
                ["none"] if method in ("head_only", "single_adapter") else list(res.config.main.banks)
            ):
                sel = res.select("main", task=task, method=method, bank=bank)
                if not sel:
                    continue
                f1 = Stat([r["f1"] for r in sel if "f1" in r])
                mcc = Stat([r["mcc"] for r in sel])
                tr = Stat([r["final_train_accuracy"] for r in sel])
                secs = Stat([r["train_seconds"] for r in sel])
                rows.append(
                    [
                        res.title(task),
                        f"`{method}`",
                        bank if bank != "none" else "—",
                        f1.pct(),
                        f"{mcc.mean:.3f} ± {mcc.std:.3f}",
                        tr.pct(),
                        f"{secs.mean:.1f}",
                        sel[0]["steps"],
                        sel[0]["train_size"],
                    ]
                )
    return _table(
        [
            "task",
            "method",
            "bank",
            "F1 % (positive = 2nd label)",
            "MCC",
            "running train accuracy % (last epoch incl.)",
            "train s / run",
            "steps",
            "train examples",
        ],
        rows,
    )


def bert_base_sizes(n: int = 100, k: int = 10) -> dict[str, int]:
    """Encode a hard profile of BERT-base shape (L=12, d=768, r=48) and measure its parts."""
    L, d, r = 12, 768, 48
    g = torch.Generator().manual_seed(0)
    profile = Profile(
        kind=ProfileKind.HARD,
        bank_id="bert-base-shape",
        model_id="bert-base-shape",
        num_layers=L,
        num_adapters=n,
        hidden_size=d,
        bottleneck=r,
        labels=["0", "1"],
        head_weight=torch.randn(2, d, generator=g) * 0.02,
        head_bias=torch.zeros(2),
        k=k,
        mask_down=khot(torch.randn(L, n, generator=g), k),
        mask_up=khot(torch.randn(L, n, generator=g), k),
        meta={"method": "hard", "seed": "0", "model_name": "minilm"},
    )
    return profile_sizes(profile, xpm.encode(profile))


def size_section(res: Results) -> tuple[str, dict]:
    """Bytes of each kind of profile, and the masks-alone ratio against one fp32 adapter."""
    m = res.config.main
    rows = []
    for task in m.tasks:
        single = _single_sizes(res, task)
        for method in [x for x in METHOD_ORDER if x in m.methods]:
            sel = [r for r in res.select("main", task=task, method=method)]
            if not sel:
                continue
            r0 = sel[0]
            total = _median([r["profile_bytes"] for r in sel])
            cells = [
                res.title(task),
                f"`{method}`",
                _bytes(total),
                _bytes(r0["selection_bytes"]),
                _bytes(r0["head_bytes"]),
                _bytes(_median([r["header_bytes"] for r in sel])),
            ]
            cells += [_ratio(single[1] / total), _ratio(single[0] / total)] if single else ["—", "—"]
            rows.append(cells)
    table = _table(
        [
            "task",
            "method",
            ".xpm bytes",
            "masks / weights / adapter",
            "head (fp16)",
            "header + framing",
            "× vs single_adapter (fp32 adapter)",
            "× vs single_adapter (fp16 adapter)",
        ],
        rows,
    )
    hard = [r for r in res.runs if r["method"] == "hard"]
    facts: dict = {}
    lines = []
    for n in sorted({r["n"] for r in hard}):
        r0 = next(r for r in hard if r["n"] == n)
        ratio = r0["adapter_fp32_bytes"] / r0["selection_bytes"]
        with_head = r0["adapter_fp32_bytes"] / (r0["selection_bytes"] + r0["head_bytes"])
        whole = r0["adapter_fp32_bytes"] / r0["profile_bytes"]
        lines.append(
            [
                f"MiniLM-L6 (L={r0['num_layers']}, d={r0['hidden_size']}, r={r0['bottleneck']}), N={n}",
                _bytes(r0["selection_bytes"]),
                _bytes(r0["adapter_fp32_bytes"]),
                _ratio(ratio),
                _ratio(with_head),
                _ratio(whole),
            ]
        )
        if n == res.config.random_bank.n:
            facts["minilm"] = {"ratio": ratio, "with_head": with_head, "whole": whole, "row": r0}
    bert = bert_base_sizes(res.config.random_bank.n, max(1, res.config.random_bank.n // 10))
    b_ratio = bert["adapter_fp32_bytes"] / bert["selection_bytes"]
    lines.append(
        [
            f"BERT-base shape (L=12, d=768, r=48), N={res.config.random_bank.n}: a synthetic profile encoded "
            "by this command",
            _bytes(bert["selection_bytes"]),
            _bytes(bert["adapter_fp32_bytes"]),
            _ratio(b_ratio),
            _ratio(bert["adapter_fp32_bytes"] / (bert["selection_bytes"] + bert["head_bytes"])),
            _ratio(bert["adapter_fp32_bytes"] / bert["profile_bytes"]),
        ]
    )
    facts["bert"] = {"ratio": b_ratio}
    ratio_table = _table(
        [
            "encoder, bank",
            "masks bytes (2·L·N bits)",
            "one fp32 adapter bytes",
            "× masks alone",
            "× masks + fp16 head",
            "× whole .xpm file",
        ],
        lines,
    )
    return table + "\n\n" + ratio_table, facts


# -- targets ---------------------------------------------------------------------------------------
def _diff(a: Stat, b: Stat) -> float | None:
    return 100 * (a.mean - b.mean) if a.n and b.n else None


def targets_section(res: Results, size_facts: dict) -> tuple[str, list[list[str]]]:
    m = res.config.main
    rows: list[list[str]] = []
    notes: list[str] = []
    for bank in m.banks:
        for other, limit, sign in (
            ("single_adapter", TARGET_GAP_SINGLE, -1),
            ("head_only", TARGET_OVER_HEAD, 1),
        ):
            if "hard" not in m.methods or other not in m.methods:
                continue
            parts, ok_all, complete = [], True, True
            for task in m.tasks:
                hard = res.accuracy("main", task=task, method="hard", bank=bank)
                base = res.accuracy("main", task=task, method=other)
                d = _diff(hard, base)
                if d is None:
                    complete = False
                    parts.append(f"{res.title(task)}: no data")
                    continue
                ok = d >= -limit if sign < 0 else d >= limit
                ok_all &= ok
                noise = 100 * math.hypot(hard.std, base.std)
                parts.append(f"{res.title(task)} {d:+.2f} pts (seed noise √(σ₁² + σ₂²) = {noise:.2f})")
                if not ok:
                    trained_gap = 100 * (
                        Stat(
                            [
                                r["final_train_accuracy"]
                                for r in res.select("main", task=task, method="hard", bank=bank)
                            ]
                        ).mean
                        - Stat(
                            [r["final_train_accuracy"] for r in res.select("main", task=task, method=other)]
                        ).mean
                    )
                    notes.append(
                        f"- `hard` ({bank} bank) against `{other}` on {res.title(task)}: {d:+.2f} points, "
                        f"{'within' if abs(d) <= 2 * noise else 'beyond'} twice the seed noise ({noise:.2f}). "
                        f"Running train accuracy differs by {trained_gap:+.2f} points "
                        f"({'hard fits the training data less well too: capacity or optimisation' if trained_gap < 0 else 'hard fits the training data at least as well: a generalisation gap, not capacity'})."
                    )
            target = (
                f"`hard` within {limit:g} points of `single_adapter`, both tasks"
                if sign < 0
                else f"`hard` at least {limit:g} points above `head_only`, both tasks"
            )
            rows.append([f"{target} ({bank} bank)", "; ".join(parts), _verdict(ok_all, complete)])
    if "random" in m.banks and "trained" in m.banks:
        for method in ("hard", "soft"):
            if method not in m.methods:
                continue
            parts, ok_all, complete = [], True, True
            for task in m.tasks:
                d = _diff(
                    res.accuracy("main", task=task, method=method, bank="random"),
                    res.accuracy("main", task=task, method=method, bank="trained"),
                )
                if d is None:
                    complete = False
                    parts.append(f"{res.title(task)}: no data")
                    continue
                ok_all &= d >= -TARGET_RANDOM_VS_TRAINED
                parts.append(f"{res.title(task)} random − trained = {d:+.2f} pts")
            rows.append(
                [
                    f"random bank within {TARGET_RANDOM_VS_TRAINED:g} points of the trained bank (`{method}`)",
                    "; ".join(parts),
                    _verdict(ok_all, complete),
                ]
            )
    if "minilm" in size_facts:
        f = size_facts["minilm"]
        ok = f["ratio"] >= TARGET_MASK_RATIO
        rows.append(
            [
                f"masks alone ≥ {TARGET_MASK_RATIO:,}× smaller than one fp32 adapter",
                f"{_ratio(f['ratio'])} (with the fp16 head {_ratio(f['with_head'])}; whole file "
                f"{_ratio(f['whole'])}); BERT-base shape {_ratio(size_facts['bert']['ratio'])}",
                _verdict(ok, True),
            ]
        )
        if not ok:
            r0 = f["row"]
            d, r, n = r0["hidden_size"], r0["bottleneck"], r0["n"]
            notes.append(
                f"- Masks against one fp32 adapter: the ratio is 32·L·(2dr + r + d) bits over 2·L·N bits = "
                f"16·(2dr + r + d)/N, which does not depend on training. For MiniLM-L6 (d={d}, r={r}) and N={n} it is "
                f"{_ratio(f['ratio'])}; the paper's 10,000× is a BERT-base figure (d=768, r=48), where the same "
                f"N gives {_ratio(size_facts['bert']['ratio'])}. With this small encoder the target would need "
                f"N ≤ {int(16 * (2 * d * r + r + d) / TARGET_MASK_RATIO)}."
            )
    table = _table(["target", "measured (mean over seeds)", "verdict"], rows)
    text = table
    if notes:
        text += "\n\nWhere a target is missed, what the data says:\n\n" + "\n".join(notes)
    return text, rows


def _verdict(ok: bool, complete: bool) -> str:
    if not complete:
        return "incomplete"
    return "**met**" if ok else "**missed**"


# -- the page ------------------------------------------------------------------------------------
def _hardware(res: Results) -> str:
    lines = []
    total = 0.0
    for s in res.sessions:
        end = next((e for e in res.ends if e["session"] == s["session"]), None)
        if end is not None:
            wall, why = end["wall_seconds"], end["reason"]
        else:
            last = max(
                (r.get("finished_at", 0) for r in res.runs + res.banks if r.get("session") == s["session"]),
                default=s["time"],
            )
            wall, why = last - s["time"], "killed (no end row)"
        total += wall
        when = dt.datetime.fromtimestamp(s["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        dtype = s.get("model_checkpoint_dtype", "?")
        lines.append(
            [
                when,
                s["device"],
                f"torch {s['torch']}, transformers {s['transformers']}, Python {s['python']}",
                f"`{s['model']}` ({s['model_id']}, stored {dtype})",
                "TF32" if s.get("tf32") else "fp32",
                f"{wall:.0f} s",
                why,
            ]
        )
    table = _table(["session start", "device", "software", "encoder", "matmul", "wall time", "ended"], lines)
    for s in res.sessions:
        if "kernels" in s:
            on = [k for k, v in s["kernels"].items() if v] or ["none"]
            table += (
                f"\n\nEvaluation on {s['device']} ran the serving path, Triton kernels on: {', '.join(on)}; "
                f"at session start they matched the torch reference to {s['kernels_max_logit_diff']:.2e} "
                "(largest logit difference, random hard profile, 32 dev inputs)."
            )
            break
        if "kernels_check_error" in s:
            table += f"\n\nThe kernel check at session start failed: `{s['kernels_check_error']}`."
            break
    busy = sum(r["train_seconds"] + r["eval_seconds"] for r in res.runs + res.tune)
    banks = sum(r["seconds"] for r in res.banks)
    return (
        table + f"\n\nTotal wall time {total:.0f} s, of which training and evaluating the "
        f"{len(res.runs) + len(res.tune)} runs took {busy:.0f} s and building the trained banks {banks:.0f} s "
        "(the rest: loading the encoder and data, and the deadline margin)."
    )


def _bank_section(res: Results) -> str:
    c = res.config
    if c.trained_bank is None:
        return "No trained bank in this config."
    tb = c.trained_bank
    lines = []
    for task, source in tb.source.items():
        if task not in c.main.tasks:
            continue
        row = next((b for b in res.banks if b["for_task"] == task), None)
        if row is None:
            lines.append(
                [res.title(task), res.title(source), "not built in these results", "", "", "", "", ""]
            )
            continue
        lines.append(
            [
                res.title(task),
                res.title(source),
                f"{row['n']} × {row['slice_size']} ({row['slices']})",
                f"{row['epochs']} epoch(s), {row['steps']} steps of {row['batch_size']}",
                f"adapter {row['lr_adapter']:g}, head {row['lr_head']:g}",
                f"{100 * row['adapter_train_accuracy_mean']:.1f} "
                f"[{100 * row['adapter_train_accuracy_min']:.1f}, {100 * row['adapter_train_accuracy_max']:.1f}]",
                f"{row['seconds']:.0f} s",
                f"`{row['bank_id']}`",
            ]
        )
    table = _table(
        [
            "bank for",
            "trained on",
            "adapters × examples (slices)",
            "training",
            "learning rates",
            "adapter running train acc. % mean [min, max]",
            "build time",
            "bank id",
        ],
        lines,
    )
    return f"""Each evaluated task gets its own trained bank of N = {tb.n} adapters, and no adapter in it has seen
that task: the bank is trained on the *other* task's train file only (never a dev set). Each adapter is
a `single_adapter` profile in all but the loop that trains it (same initialisation, objective, AdamW,
learning rates and linear decay; `{tb.adapters_per_step}` adapters train side by side in one batched
forward, each on its own slice with its own loss), stored as an `.xpm` and stacked like
`xpeft bank from-adapters` does (fp16-rounded). The slices are disjoint where the source task has
enough examples for N slices, and otherwise seeded random subsets (they then overlap across adapters).

Why not adapters trained on the evaluated task with other label mappings: both tasks have two
labels, so the only other mapping swaps them, and an adapter trained on swapped labels learns the
same features as the task's own adapter (only its head flips sign). Such a bank would hold the
evaluated task's own adapter in disguise. Slices of the task itself were rejected for the same
reason. The config check refuses a bank whose source is the evaluated task.

{table}"""


def _choices(res: Results) -> str:
    c = res.config
    done = {r["key"]: r for r in res.tune}
    chosen, table = choose_hyperparameters(c, done)
    parts = []
    if c.tune is not None:
        tc = c.tune
        rows = [
            [
                f"`{e['method']}`",
                e["param"],
                f"{e['value']:g}",
                "—" if e["holdout_accuracy"] is None else f"{100 * e['holdout_accuracy']:.2f}",
                "✓" if e.get("chosen") else "",
            ]
            for e in table
        ]
        parts.append(
            f"A small search on {res.title(tc.task)}'s *train* file only: {tc.train_size} examples to train on and "
            f"{tc.holdout_size} held out from the same file (seed {tc.seed}), {tc.epochs} epoch(s), seed 0, the random "
            f"bank (N = {c.random_bank.n}, k = N·{c.main.k_fraction:g}). One parameter per method, the others at their "
            "defaults; the best held-out accuracy wins (ties: the first listed). The same values then serve both tasks "
            "(no search on the other task), and no dev set was looked at for any choice.\n\n"
            + _table(["method", "parameter", "value", "held-out accuracy %", "chosen"], rows)
        )
    final = []
    for method in [x for x in METHOD_ORDER if x in c.main.methods]:
        hp = chosen[method]
        knob = {
            "hard": f"lr_scores {hp.lr_scores:g}, lr_head {hp.lr_head:g}",
            "soft": f"lr_scores {hp.lr_scores:g}, lr_head {hp.lr_head:g}",
            "single_adapter": f"lr_adapter {hp.lr_adapter:g}, lr_head {hp.lr_head:g}",
            "head_only": f"lr_head {hp.lr_head:g}",
        }[method]
        final.append([f"`{method}`", knob])
    parts.append("Learning rates used in the grid:\n\n" + _table(["method", "learning rates"], final))
    t = c.train
    fixed = [
        f"- k = N·{c.main.k_fraction:g} (the `TrainConfig` default, N/10), fixed before any run; the k sweep below "
        "shows the others on the dev set but did not choose it.",
        f"- Softmax temperature {t.temperature:g} (soft masks and the straight-through backward), mask-score "
        f"initialisation N(0, {t.score_init_std:g}²) (a random initial top-k), the encoder's dropout "
        f"{'on' if t.dropout else 'off'} while training, AdamW (weight decay 0.01, none on scores), linear decay.",
        f"- Random bank: seed {c.random_bank.seed}, init scale {c.random_bank.init_scale:g} (`create_random_bank`), "
        "one bank shared by every seed (the bank is a frozen artefact; the seed varies the profile's training).",
    ]
    for name, task in c.tasks.items():
        if name not in c.main.tasks:
            continue
        size = f"a seeded subset of {task.train_size:,}" if task.train_size else "all"
        dev = f"a seeded subset of {task.dev_size:,}" if task.dev_size else "all"
        fixed.append(
            f"- {res.title(name)}: {size} train examples (subset seed {task.subset_seed}), {dev} of the "
            f"dev examples, max_length {task.max_length}, {task.epochs} epoch(s), batch {task.batch_size}."
        )
    parts.append("Fixed choices:\n\n" + "\n".join(fixed))
    return "\n\n".join(parts)


def render(res: Results, out: Path, img_dir: Path, notes: str | None, command: str, results_path: str) -> str:
    rel = lambda p: Path(p).resolve().relative_to(out.parent.resolve()).as_posix()  # noqa: E731
    sweeps = plot_sweeps(res, img_dir)
    curves = plot_curves(res, img_dir)
    sizes, size_facts = size_section(res)
    targets, _ = targets_section(res, size_facts)
    c = res.config
    argv = res.sessions[-1].get("argv") or []
    run_cmd = " ".join(["python -m xpeft.profiles.suite"] + list(argv[1:])) if argv else ""
    purpose = f"\n> **Config `{c.name}`:** {c.purpose}\n" if c.purpose else ""
    done = len(res.runs) + len(res.tune)
    status = f"{done} of {len(res.planned)} planned runs are in the results" + (
        f"; missing: {', '.join(res.missing[:12])}{' …' if len(res.missing) > 12 else ''}."
        if res.missing
        else " (the grid is complete)."
    )
    sections = [
        f"""# Evaluation: X-PEFT against its baselines on {" and ".join(res.title(t) for t in c.main.tasks)}

Generated by `{command}` from `{results_path}`; do not edit by hand. The results file was written by
`python -m xpeft.profiles.suite run` (last session: `{run_cmd}`) with the config `{c.name}` it records.
{purpose}
{status}

## Targets

{targets}

## Main table

Accuracy on each task's dev set (mean ± sample std over training seeds; the seed count in brackets).
The baselines read no bank, so they have one row. Bytes are the `.xpm` file the server stores; the
ratios compare it with a `single_adapter` profile, whose adapter the file keeps in fp16 (measured) or
would keep in fp32 (measured + 2 bytes per adapter value).

{main_table(res)}

{_bank_id_note(res)}More metrics (mean over seeds; running train accuracy counts every batch of the run):

{detail_table(res)}

## Profile size

{sizes}
"""
    ]
    if sweeps:
        s = c.sweeps
        assert s is not None
        seeds = sorted({r["seed"] for r in res.select("sweep")})
        sections.append(f"""## Sweeps over N and k

{res.title(s.task)}, {s.bank} bank, seeds {seeds} (runs present), other settings as in the main table.

![accuracy against N]({rel(sweeps["n"])})

![accuracy against k]({rel(sweeps["k"])})

{_sweep_table(res)}
""")
    if curves:
        sections.append(
            "## Training curves: soft against hard\n\n"
            + "\n\n".join(f"![{task} curves]({rel(p)})" for task, p in curves.items())
            + "\n\nThe first seed's random-bank runs of the main table, evaluated on a fixed dev subset every few steps "
            "while training (faint: each batch's loss; bold: its moving mean).\n"
        )
    sections.append(f"## The trained bank\n\n{_bank_section(res)}\n")
    sections.append(f"## Choices\n\n{_choices(res)}\n")
    sections.append(f"## Hardware and time\n\n{_hardware(res)}\n")
    if notes:
        sections.append(f"## Discussion\n\n{notes.strip()}\n")
    sections.append(f"""## Reproduce

```bash
{run_cmd or "python -m xpeft.profiles.suite run --config bench/eval/<config>.json --out <results>.jsonl"}
{command}
```
""")
    return "\n".join(sections)


def _bank_id_note(res: Results) -> str:
    """A bank rebuilt in a later session may differ in its last bits (GPU training is not bit-exact)."""
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in res.runs:
        if r["bank"] == "trained":
            ids[(r["task"], r["bank"])].add(r["bank_id"])
    split = [f"{res.title(task)} ({len(v)} ids)" for (task, _), v in sorted(ids.items()) if len(v) > 1]
    if not split:
        return ""
    return (
        "Note: the trained bank was rebuilt by a resumed session, so its runs span more than one bank id: "
        + ", ".join(split)
        + ".\n\n"
    )


def _sweep_table(res: Results) -> str:
    s = res.config.sweeps
    assert s is not None
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in res.select("sweep", task=s.task, bank=s.bank):
        groups[(r["n"], r["method"], r["k"])].append(r["accuracy"])
    rows = [
        [
            n,
            f"`{method}`",
            k if method == "hard" else "—",
            Stat(v).pct(),
            _bytes(next(r["selection_bytes"] for r in res.select("sweep", n=n, method=method))),
        ]
        for (n, method, k), v in sorted(groups.items())
    ]
    return _table(["N", "method", "k", "accuracy % (seeds)", "masks / weights bytes"], rows)


def write_report(
    results: str | Path,
    out: str | Path = "docs/EVALUATION.md",
    img_dir: str | Path | None = None,
    notes: str | Path | None = None,
    command: str = "",
) -> Path:
    """Render the report and its plots; returns the Markdown path."""
    out = Path(out)
    img = Path(img_dir) if img_dir else out.parent / "img"
    res = Results.load(results)
    text = render(
        res,
        out,
        img,
        Path(notes).read_text() if notes else None,
        command or f"python -m xpeft.profiles.suite report --results {results} --out {out}",
        str(results),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
