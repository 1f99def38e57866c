"""Write docs/BENCHMARKS.md and docs/img/bench_*.png from the offline benchmark's JSON.

    python -m bench.report                                   # CPU JSON, plus the GPU JSON if present
    python -m bench.report --cpu bench/results/cpu.json --gpu bench/results/cuda.json \\
        --checks bench/results/gpu_check.json

Every number in the page comes from those files; the page names the command and the hardware
that produced each. The CPU and the GPU runs are separate files, merged here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.common.backend_tables import backend_tables
from bench.gpu_age import age_note, measured_commit
from bench.serving_report import checks_block, serving_sections

VARIANTS = {
    "base": "the frozen encoder alone, no adapters (the ceiling)",
    "warm": "X-PEFT, every profile's fused weights in its slot of the device pool: one forward, each row "
    "indexing the pool by its slot id",
    "cold": "X-PEFT through the runtime with nothing cached (`MultiProfileModel.fuse_into_pool`: the "
    "selected adapters' indices and weights from the masks on the host, one copy to the device, a gather "
    "of those adapters (one GEMM over the bank once U k passes 4 N on a CPU, N on a GPU), one indexed "
    "copy into the slots, the heads), then the same forward as `warm`",
    "cold_batched": "X-PEFT with nothing fused yet, mixing weights already on the device: one fusion GEMM "
    "straight into the forward (batched fusion)",
    "naive": "the PEFT / AdapterHub way: one forward per profile's group of rows, its adapter ready (no fusion)",
    "base_graph": "the base encoder captured as a CUDA graph and replayed (launch overhead removed)",
    "warm_graph": "`warm` as a CUDA graph; ratio against `base_graph`",
    "cold_batched_graph": "`cold_batched` as a CUDA graph, fusion inside; ratio against `base_graph`",
}
TARGETS = {"cuda": 0.90, "cpu": 0.85}  # a cold batch of 64 distinct profiles against the base encoder


def load(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "ms" in r]


def label(r: dict) -> str:
    text = r["variant"]
    if r.get("apply") not in (None, "none"):
        text += f" ({r['apply']})"
    if r.get("N"):
        text += f", N={r['N']}"
    return text


def meta_block(data: dict, name: str) -> list[str]:
    m = data["meta"]
    lines = [
        f"- hardware: {m['hardware']}",
        f"- command: `{m['command']}`",
        f"- software: torch {m['torch']}, transformers {m['transformers']}, Triton {m['triton']}, "
        f"Python {m['python']}",
        f"- run: {m['date']}, git {m['git']}, {m.get('wall_s', '?')} s",
        f"- model: `{m['grid']['model']}`, {m['grid']['dtype']}, {m['grid']['seq_len']} tokens per row, "
        f"random token ids with a full attention mask; {m['grid']['note']}",
        f"- each time is the {m['grid'].get('estimator', 'median')} over its rounds (or timing blocks)",
    ]
    if "load" in m:
        lines.append(f"- host load average (1 min) at start / end: {m['load']}")
    return [f"### {name}", "", *lines, ""]


def throughput_table(rows: list[dict]) -> list[str]:
    """One table per batch size: rows are variants, columns distinct profiles."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        part = [r for r in rows if r["batch"] == batch]
        distinct = sorted({r["distinct"] for r in part if r["distinct"]})
        keys: list[str] = []
        cells: dict[tuple[str, int], str] = {}
        for r in part:
            key = label(r)
            if key not in keys:
                keys.append(key)
            cell = f"{r['seq_per_s']:,.0f} ({r['ratio_to_base']:.2f}x)"
            if r["distinct"]:
                cells[(key, r["distinct"])] = cell
            else:
                for u in distinct:
                    cells[(key, u)] = cell
        out += [
            f"Batch of {batch} rows: sequences/s (ratio to the base of the same rounds; `_graph` rows to "
            "`base_graph`).",
            "",
            "| variant | " + " | ".join(f"U={u}" for u in distinct) + " |",
            "| --- | " + " | ".join("---:" for _ in distinct) + " |",
        ]
        out += [f"| {k} | " + " | ".join(cells.get((k, u), "") for u in distinct) + " |" for k in keys]
        out.append("")
    return out


def headline(data: dict, device: str) -> list[str]:
    """The issue's targets, read off this run."""
    rows = measured(data["throughput"])
    if not rows:
        return []
    u = max(r["distinct"] for r in rows if r["distinct"] <= 64)
    at = [r for r in rows if r["distinct"] == u]
    if not at:
        return []
    target = TARGETS[device]

    def best(variant: str) -> dict | None:
        found = [r for r in at if r["variant"] == variant]
        return max(found, key=lambda r: r["ratio_to_base"]) if found else None

    naive = best("naive")
    lines = [
        f"At U={u} distinct profiles (batch {at[0]['batch']}), target for a cold batch: {target}x the base "
        "encoder; against the naive loop: 10x.",
        "",
        "| variant | ratio to base | vs naive | target met |",
        "| --- | ---: | ---: | --- |",
    ]
    for variant in ("cold", "cold_batched", "warm", "cold_batched_graph", "warm_graph", "naive"):
        r = best(variant)
        if r is None:
            continue
        vs_naive = f"{naive['ms'] / r['ms']:.1f}x" if naive and variant != "naive" else ""
        met = "" if variant == "naive" else ("yes" if r["ratio_to_base"] >= target else "no")
        lines.append(f"| {label(r)} | {r['ratio_to_base']:.3f} | {vs_naive} | {met} |")
    return lines + ["", "Each row is the best apply path and N for that variant; the full grid follows.", ""]


def fusion_table(rows: list[dict]) -> list[str]:
    methods = sorted({r["method"] for r in rows})
    out = [
        "Fusion alone, ms per call: GEMM over the whole bank against gathers that read only the "
        "k selected adapters (k = N/10). `gather_torch` sums the selected rows with `embedding_bag`, "
        "without copying them; it is the faster while U k stays within a few N, and the runtime "
        "picks by that bound (4 N on a CPU, N on a GPU).",
        "",
        "| N | U | k | " + " | ".join(methods) + " | fastest |",
        "| ---: | ---: | ---: |" + " ---: |" * len(methods) + " --- |",
    ]
    for n in sorted({r["N"] for r in rows}):
        for u in sorted({r["distinct"] for r in rows if r["N"] == n}):
            part = {r["method"]: r for r in rows if r["N"] == n and r["distinct"] == u}
            timed = {m: r["ms"] for m, r in part.items() if "ms" in r}
            cells = [
                f"{part[m]['ms']:.3f}" if m in timed else part.get(m, {}).get("skipped", "") for m in methods
            ]
            k = next(iter(part.values()))["k"]
            fastest = min(timed, key=timed.get) if timed else ""
            out.append(f"| {n} | {u} | {k} | " + " | ".join(cells) + f" | {fastest} |")
    return out + [""]


def apply_table(rows: list[dict]) -> list[str]:
    impls = sorted({r["apply"] for r in rows})
    out = [
        "One layer's per-row adapters (down, ReLU, up, residual), ms per call:",
        "",
        "| U | batch | " + " | ".join(impls) + (" | torch / triton |" if len(impls) > 1 else " |"),
        "| ---: | ---: |" + " ---: |" * (len(impls) + (len(impls) > 1)),
    ]
    for u in sorted({r["distinct"] for r in rows}):
        part = {r["apply"]: r for r in rows if r["distinct"] == u and "ms" in r}
        if not part:
            continue
        cells = [f"{part[i]['ms']:.4f}" if i in part else "" for i in impls]
        if len(impls) > 1 and {"torch", "triton"} <= part.keys():
            cells.append(f"{part['torch']['ms'] / part['triton']['ms']:.1f}x")
        out.append(f"| {u} | {next(iter(part.values()))['batch']} | " + " | ".join(cells) + " |")
    return out + [""]


def plot(data: dict, device: str, img_dir: Path) -> list[str]:
    """Throughput against distinct profiles per batch, one line per variant; fusion ms against U."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    names = []
    rows = measured(data["throughput"])
    n_first = min(data["meta"]["grid"]["adapters"])
    series: dict[str, list[dict]] = {}
    for r in rows:  # N's effect is in the tables; the plot keeps the smallest bank
        if r["distinct"] and r.get("N") in (None, n_first):
            series.setdefault(label(r), []).append(r)
    distinct = sorted({r["distinct"] for r in rows if r["distinct"]})
    batch_of = {r["distinct"]: r["batch"] for r in rows if r["distinct"]}
    bases = {r["batch"]: r["seq_per_s"] for r in rows if r["variant"] == "base"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    ax.plot(distinct, [bases[batch_of[u]] for u in distinct], "k--", linewidth=2, label="base encoder")
    colors = plt.get_cmap("tab10")
    for i, (key, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda r: r["distinct"])
        style = {"color": colors(i % 10), "marker": "o", "linestyle": ":" if "torch" in key else "-"}
        ax.plot([p["distinct"] for p in points], [p["seq_per_s"] for p in points], label=key, **style)
        bx.plot([p["distinct"] for p in points], [p["ratio_to_base"] for p in points], label=key, **style)
    bx.axhline(TARGETS[device], color="k", linewidth=1, linestyle="--", label=f"target {TARGETS[device]}x")
    bx.axhline(1.0, color="grey", linewidth=0.8)
    for axis in (ax, bx):
        axis.set_xscale("log", base=2)
        axis.set_xticks(distinct, [str(u) for u in distinct])
        axis.set_xlabel(f"distinct profiles per batch (batch = max({data['meta']['grid']['batch']}, U) rows)")
        axis.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("sequences / s")
    bx.set_ylabel("ratio to base (graph variants: to the graphed base)")
    bx.set_ylim(0, 1.2)
    bx.legend(fontsize=7, loc="lower left")
    fig.suptitle(
        f"{device.upper()}: {data['meta']['hardware'][:70]}, {data['meta']['grid']['model']}, "
        f"{data['meta']['grid']['dtype']}, N={n_first}",
        fontsize=10,
    )
    fig.tight_layout()
    name = f"bench_{device}_throughput.png"
    fig.savefig(img_dir / name, dpi=100)
    plt.close(fig)
    names.append(name)

    fusion = measured(data["fusion"])
    if fusion:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for method in sorted({r["method"] for r in fusion}):
            for n in sorted({r["N"] for r in fusion}):
                pts = sorted(
                    (r["distinct"], r["ms"]) for r in fusion if r["method"] == method and r["N"] == n
                )
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method}, N={n}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("profiles fused at once (U)")
        ax.set_ylabel("ms per fusion")
        ax.set_title(f"{device.upper()} fusion: GEMM vs gather", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        name = f"bench_{device}_fusion.png"
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def section(data: dict, device: str, title: str, img_dir: Path, doc_dir: Path) -> list[str]:
    out = [f"## {title}", "", *meta_block(data, "Provenance"), "### Targets", "", *headline(data, device)]
    for name in plot(data, device, img_dir):
        out += [f"![{name}]({Path(os.path.relpath(img_dir, doc_dir)).as_posix()}/{name})", ""]
    out += ["### Throughput", "", *throughput_table(measured(data["throughput"]))]
    errors = [r for r in data["throughput"] if "error" in r or "skipped" in r]
    if errors:
        out += ["Not measured: " + "; ".join(json.dumps(e) for e in errors), ""]
    out += [
        "### Fusion",
        "",
        *fusion_table(data["fusion"]),
        "### Adapter application",
        "",
        *apply_table(data["apply"]),
    ]
    return out


def render(
    cpu: dict | None,
    gpu: dict | None,
    checks: dict | None,
    command: str,
    img_dir: Path,
    doc_dir: Path,
    serving_cpu: dict | None = None,
    single: dict | None = None,
    budgets: dict | None = None,
    abstain_speed: dict | None = None,
    single8: dict | None = None,
    backends: list[str] | None = None,
    gpu_paths: tuple[Path, Path] = (Path("bench/results/cuda.json"), Path("bench/results/gpu_check.json")),
) -> str:
    lines = [
        "# Benchmarks",
        "",
        *age_note(gpu, checks, *gpu_paths),
        f"Generated by `{command}` from the JSON that the benchmark commands wrote; do not edit by hand. "
        "Every ratio compares medians from the same run and the same rounds: each round runs every "
        "variant of a batch size once, in rotating order.",
        "",
        "Reproduce: `python -m bench.offline --device cpu` (writes `bench/results/cpu.json`); on a GPU "
        "machine `OUT=out python bench/gpu_check.py` (writes `out/bench_cuda.json` and "
        "`out/gpu_check.json`, copied to `bench/results/cuda.json` and `bench/results/gpu_check.json`); "
        "then `python -m bench.report`. The serving path: on a GPU machine `bench/gpu_run.sh` "
        "(after `bench/gpu_prepare.sh` here; it runs the same gpu_check with the runtime and HTTP "
        "steps), on a CPU `python -m bench.gpu_check --cpu --out bench/results/serving-cpu` and "
        "`python -m bench.load.single` (wrk).",
        "",
        "The server under HTTP load (10,000 profiles in Redis, Zipf traffic, latency percentiles, "
        "throughput against offline, Redis bytes and server memory against profiles stored) is "
        "measured by `python -m bench.load.run` and reported in [LOAD_TEST.md](LOAD_TEST.md).",
        "",
        "What is timed: the encoder forward with each row's adapters, pooled embeddings out, on pre-made "
        "random token ids. Tokenization and the per-profile heads (one small matmul per row) are outside "
        "every variant alike. Profiles are random hard-mask profiles (`profiles/synthetic.py`, k = N/10).",
        "",
        "| variant | what it runs |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in VARIANTS.items()],
        "",
        "`(torch)` / `(triton)`: which path applies the per-row adapters (`layer.apply_adapters` or the "
        "SGMV kernel in `adapters/kernels.py`). U: distinct profiles per batch; N: adapters in the bank.",
        "",
        "Reading the tables:",
        "",
        "- `cold` against `cold_batched` is the cost of the runtime's host-side work per profile "
        "(masks to weights, the copy into the pool's slots, the heads), not of fusion itself, which "
        "the Fusion table times alone.",
        "- `warm` against `base` is the price of applying per-row adapters read from the slot pool; "
        "the Adapter application table times one layer's share of it.",
        "- When a forward's enqueue time is close to its finished time (GPU host-cost list), the batch "
        "is bound by Python and kernel launches; the `_graph` variants show the same work with "
        "launches replayed from a CUDA graph.",
        "",
    ]
    if gpu:
        found = measured_commit(gpu, gpu_paths[0])
        if found and gpu["meta"].get("git", "unknown") == "unknown":  # the GPU section names its commit
            gpu = {**gpu, "meta": {**gpu["meta"], "git": f"`{found[0]}` ({found[1]})"}}
        lines += section(gpu, "cuda", "GPU", img_dir, doc_dir)
        if checks:
            lines += checks_block(checks)
    if cpu:
        lines += section(cpu, "cpu", "CPU", img_dir, doc_dir)
    if backends:
        lines += ["## Encoder backends (CPU)", "", *backends, ""]
    lines += serving_sections(checks, serving_cpu, single, budgets, abstain_speed, single8)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", type=Path, default=Path("bench/results/cpu.json"))
    parser.add_argument("--gpu", type=Path, default=Path("bench/results/cuda.json"))
    parser.add_argument("--checks", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--serving-cpu", type=Path, default=Path("bench/results/serving-cpu/gpu_check.json"))
    parser.add_argument("--single", type=Path, default=Path("bench/load/results/single.json"))
    parser.add_argument("--single-budgets", type=Path, default=Path("bench/load/results/single-budgets.json"))
    parser.add_argument("--single-8", type=Path, default=Path("bench/load/results/single-8.json"))
    parser.add_argument("--backends", type=Path, default=Path("bench/results/backends.json"))
    parser.add_argument(
        "--backends-accuracy", type=Path, default=Path("bench/results/backends-accuracy.json")
    )
    parser.add_argument("--abstain-speed", type=Path, default=Path("bench/results/abstain-speed.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    parser.add_argument("--img", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    cpu, gpu, checks = load(args.cpu), load(args.gpu), load(args.checks)
    if not (cpu or gpu):
        parser.error("no benchmark JSON found: run python -m bench.offline first")
    command = "python -m bench.report" + "".join(
        f" --{k} {v}" for k, v in vars(args).items() if v != parser.get_default(k)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    serving = load(args.serving_cpu), load(args.single), load(args.single_budgets), load(args.abstain_speed)
    backends = backend_tables(args.backends, args.backends_accuracy)
    text = render(
        cpu,
        gpu,
        checks,
        command,
        args.img,
        args.out.parent,
        *serving,
        load(args.single_8),
        backends,
        (args.gpu, args.checks),
    )
    args.out.write_text(text)
    print(f"wrote {args.out} and {args.img}/bench_*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
