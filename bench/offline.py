"""The offline benchmark: throughput of X-PEFT mixed batches against the base encoder of the same run.

    python -m bench.offline --device cpu    # MiniLM, fp32, reduced grid -> bench/results/cpu.json
    python -m bench.offline --device cuda   # random BERT-base, bf16, 128 tokens -> bench/results/cuda.json
    python -m bench.report                  # docs/BENCHMARKS.md and docs/img/bench_*.png from the JSON

Three sections: ``throughput`` (sequences/s of whole batches: base, X-PEFT warm and cold, the naive
per-profile loop; every ratio is against the base encoder's median from the same rounds), ``fusion``
(GEMM against gather, torch and Triton) and ``apply`` (one layer's per-row adapters, torch against
the Triton SGMV kernel). bench/gpu_check.py runs the same sections under a time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.measure import (
    MixedBatch,
    bench_encoder,
    make_profiles,
    provenance,
    random_bank,
    round_robin,
    time_apply,
    time_fusion,
)
from xpeft.adapters import kernels
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.engine.runtime import MultiProfileModel


@dataclass
class Grid:
    """What one run measures. Batches hold ``max(batch, U)`` rows, so every row can be its own profile."""

    model: str
    dtype: str
    seq_len: int
    batch: int
    distinct: list[int]
    adapters: list[int]
    rounds: int
    fusion_distinct: list[int]
    note: str
    estimator: str = "median"  # "min" on a shared CPU: other users' load only ever adds time
    threads: int = 0  # torch CPU threads; 0 leaves torch's default


GRIDS = {
    "cpu": Grid(
        "minilm",
        "float32",
        32,
        64,
        [1, 8, 64],
        [100, 400, 1000],
        5,
        [1, 8, 64],
        "reduced for a 2-core shared CPU: 32 tokens per row, batch 64, at most 64 distinct "
        "profiles (256 needs a batch of 256), 5 timed rounds after 1 warm-up round; each variant's "
        "fastest round counts, since other users' load on the shared cores only ever adds time; one "
        "torch thread: with two, a thread descheduled by another user's work stalls every op "
        "(measured on that CPU: forward 0.56 s on one thread, 0.8-1.4 s on two)",
        estimator="min",
        threads=1,
    ),
    "cuda": Grid(
        "random:bert-base",
        "bfloat16",
        128,
        64,
        [1, 8, 64, 256],
        [100, 400, 1000],
        10,
        [1, 8, 64, 256],
        "full grid: 128 tokens per row, batch 64 (256 rows for 256 distinct profiles), "
        "10 timed rounds after 1 warm-up round",
    ),
    "smoke": Grid("minilm", "float32", 8, 4, [1, 4], [20], 1, [1, 4], "smoke test of the benchmark code"),
}

Row = dict[str, object]


def apply_impls(device: torch.device) -> list[str]:
    """The adapter-application paths to compare on this device."""
    return ["torch", "triton"] if (device.type == "cuda" and kernels.HAVE_TRITON) else ["torch"]


def fusion_methods(device: torch.device) -> list[str]:
    methods = ["gemm", "gather_torch"]
    return methods + (["gather_triton"] if device.type == "cuda" and kernels.HAVE_TRITON else [])


def with_apply(encoder: AdapterEncoder, fn: Callable[[], object], impl: str) -> Callable[[], object]:
    """``fn`` run with the apply kernel of ``encoder`` on (``triton``) or off (``torch``)."""

    def call() -> object:
        with encoder.kernels_switched(apply=impl == "triton"):
            return fn()

    return call


def build_models(encoder: AdapterEncoder, grid: Grid) -> dict[int, MultiProfileModel]:
    return {n: MultiProfileModel(encoder, random_bank(encoder, n, seed=n)) for n in grid.adapters}


def run_throughput(
    encoder: AdapterEncoder,
    grid: Grid,
    models: dict[int, MultiProfileModel],
    out: list[Row],
    save: Callable[[], None],
    deadline: float = math.inf,
    min_group_s: float = 0.0,
) -> None:
    """Whole-batch throughput, one round-robin group per batch size."""
    device = encoder.device
    impls = apply_impls(device)
    first_n = grid.adapters[0]
    graphs = device.type == "cuda"
    for batch in sorted({max(grid.batch, u) for u in grid.distinct}):
        if time.monotonic() + min_group_s > deadline:
            out.append({"batch": batch, "skipped": "time budget"})
            save()
            continue
        variants: dict[str, Callable[[], object]] = {}
        labels: dict[str, Row] = {}
        errors: list[Row] = []
        for u in (u for u in grid.distinct if max(grid.batch, u) == batch):
            for n in grid.adapters:
                mb = MixedBatch(
                    models[n], make_profiles(models[n].bank, u, seed=10_000 * n), batch, grid.seq_len
                )
                if "base" not in variants:
                    variants["base"], labels["base"] = (
                        mb.base,
                        {"variant": "base", "distinct": 0, "N": None, "apply": "none"},
                    )
                runs: list[tuple[str, Callable[[], object], str]] = []
                if n == first_n:  # warm and naive do not depend on N: fused weights have one shape
                    runs += [("warm", mb.warm, impl) for impl in impls] + [("naive", mb.naive, "torch")]
                runs += [
                    (v, fn, impl)
                    for impl in impls
                    for v, fn in (("cold", mb.cold), ("cold_batched", mb.cold_batched))
                ]
                for variant, fn, impl in runs:
                    name = f"{variant} U={u} N={n} {impl}"
                    variants[name] = with_apply(encoder, fn, impl)
                    labels[name] = {
                        "variant": variant,
                        "distinct": u,
                        "N": n if variant.startswith("cold") else None,
                        "apply": impl,
                    }
                if graphs:
                    add_graphs(mb, u, n, n == first_n, impls, variants, labels, errors)
        times = round_robin(variants, device, grid.rounds, warmup=1, deadline=deadline)
        pick = min if grid.estimator == "min" else statistics.median
        for name, ts in times.items():
            baseline = pick(times[labels[name].get("baseline", "base")])
            t = pick(ts)
            out.append(
                {
                    **labels[name],
                    "batch": batch,
                    "ms": t * 1e3,
                    "seq_per_s": batch / t,
                    "ratio_to_base": baseline / t,
                    "rounds": len(ts),
                    "estimator": grid.estimator,
                    "ms_median": statistics.median(ts) * 1e3,
                    "ms_min": min(ts) * 1e3,
                    "spread": (max(ts) - min(ts)) / statistics.median(ts),
                }
            )
        out.extend(errors)
        save()


def add_graphs(
    mb: MixedBatch,
    u: int,
    n: int,
    first: bool,
    impls: list[str],
    variants: dict[str, Callable[[], object]],
    labels: dict[str, Row],
    errors: list[Row],
) -> None:
    """CUDA-graph variants (GPU only): the same work with launch overhead gone, against a graphed base."""
    wanted = [("base", "none")] if "base_graph" not in variants else []
    wanted += [("warm", impl) for impl in impls if first] + [("cold_batched", impl) for impl in impls]
    for variant, impl in wanted:
        name = "base_graph" if variant == "base" else f"{variant}_graph U={u} N={n} {impl}"
        try:
            with mb.model.encoder.kernels_switched(apply=impl == "triton"):
                variants[name] = mb.graph(variant)
        except Exception as exc:  # a capture that fails is a result to report, not a crash
            errors.append(
                {
                    "variant": f"{variant}_graph",
                    "distinct": u,
                    "N": n,
                    "apply": impl,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            continue
        labels[name] = {
            "variant": f"{variant}_graph",
            "distinct": 0 if variant == "base" else u,
            "N": n if variant == "cold_batched" else None,
            "apply": impl,
            "baseline": "base" if variant == "base" else "base_graph",
        }


def run_fusion(
    grid: Grid,
    models: dict[int, MultiProfileModel],
    out: list[Row],
    save: Callable[[], None],
    deadline: float = math.inf,
) -> None:
    """Fusion alone: GEMM over the whole bank against gathers that read only the k selected adapters."""
    for n, model in models.items():
        bank = model.device_bank
        device = bank.down.device
        for u in grid.fusion_distinct:
            profiles = make_profiles(bank, u, seed=7)
            k = profiles[0].k
            for method in fusion_methods(device):
                row: Row = {"N": n, "distinct": u, "k": k, "method": method}
                if time.monotonic() > deadline:
                    row["skipped"] = "time budget"
                else:
                    row["ms"] = time_fusion(bank, profiles, device, method, grid.estimator) * 1e3
                out.append(row)
        save()


def run_apply(
    encoder: AdapterEncoder,
    grid: Grid,
    models: dict[int, MultiProfileModel],
    out: list[Row],
    save: Callable[[], None],
    deadline: float = math.inf,
) -> None:
    """One layer's per-row adapter application, batch of ``max(batch, U)`` rows."""
    bank = models[grid.adapters[0]].device_bank
    for u in grid.distinct:
        batch = max(grid.batch, u)
        for impl in apply_impls(encoder.device):
            if time.monotonic() > deadline:
                out.append({"distinct": u, "batch": batch, "apply": impl, "skipped": "time budget"})
                continue
            ms = time_apply(encoder, bank, batch, grid.seq_len, u, impl == "triton", grid.estimator) * 1e3
            out.append({"distinct": u, "batch": batch, "seq_len": grid.seq_len, "apply": impl, "ms": ms})
        save()


def write_json(path: Path, data: dict) -> None:
    """Atomic write, so a run cut short leaves the last complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--grid", choices=sorted(GRIDS), help="default: the device's own grid")
    parser.add_argument("--rounds", type=int, help="timed rounds per batch size (default: the grid's)")
    parser.add_argument("--out", type=Path, help="default: bench/results/<device>.json")
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid or args.device]
    if args.rounds:
        grid = replace(grid, rounds=args.rounds)
    out_path = args.out or Path("bench/results") / f"{args.device}.json"
    torch.set_grad_enabled(False)
    if grid.threads:
        torch.set_num_threads(grid.threads)
    device = torch.device(args.device)
    encoder = bench_encoder(grid.model, args.device, getattr(torch, grid.dtype))
    data: dict = {
        "meta": {
            "device": device.type,
            "command": "python -m bench.offline " + " ".join(sys.argv[1:] if argv is None else argv),
            "grid": asdict(grid),
            **provenance(device),
        },
        "throughput": [],
        "fusion": [],
        "apply": [],
    }

    def save() -> None:
        write_json(out_path, data)

    started = time.monotonic()
    load_start = os.getloadavg()[0]
    models = build_models(encoder, grid)
    run_apply(encoder, grid, models, data["apply"], save)
    run_fusion(grid, models, data["fusion"], save)
    run_throughput(encoder, grid, models, data["throughput"], save)
    data["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    data["meta"]["load"] = f"{load_start:.2f} / {os.getloadavg()[0]:.2f}"  # others share the CPU
    save()
    print(f"wrote {out_path} in {data['meta']['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
