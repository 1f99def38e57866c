"""Single-text predicts over warm profiles, from wrk, against the plain encoder on each CPU runtime and Infinity.

    python -m bench.load.single              # 32 profiles, 32 and 128 clients, 3 rounds of 15 s
                                             #   -> bench/load/results/single.json
    python -m bench.load.single --quick      # smoke run (under a minute) -> runs/single-quick.json
    python -m bench.load.single --infinity-bin ~/infinity/bin/infinity_emb --infinity-model ~/minilm-onnx
                                             # Infinity (embeddings only) over HTTP beside them
    python -m bench.load.single --texts-per-request 8 --clients 8,32 --out bench/load/results/single-8.json
    python -m bench.load.single --device cuda --texts-per-request 8   # a GPU machine
    python -m bench.load.single --flame docs/img/serving-flame.svg      # and a py-spy profile of the server
    python -m bench.load.single --budgets 256,1024,4096,16384 --rounds 1 --out bench/load/results/single-budgets.json
                                             # one server per batch token budget: what chose the default

One ``xpeft serve`` process (embedded SQLite store, the MiniLM default encoder on the backend
``--backend`` names, a random bank of N = 100) holds ``--profiles`` random profiles of ``--kind``,
each predicted once before timing (warm). Then, per client count, rounds alternate: wrk (the load
generator the numbers come from: a C program, one thread, so it takes little of the CPU the server
needs) sends predicts round-robin over the profiles; then each plain encoder (bench/load/baselines.py:
torch eager fp32 and ONNX Runtime int8; no adapters, no heads, no HTTP) runs the same texts in
batches of ``--plain-batch`` in this process, on the same number of threads, while the server idles;
then Infinity, when given, under the same wrk load. Each figure is reported as min / median / max
over the rounds, and the ratio pairs medians from the same rounds; the main ratio is taken against
the fastest plain encoder. The machine's busy share outside the measured processes is recorded per
round, so a disturbed round shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common.runs import hardware, load_texts, machine_busy, shown_command
from bench.common.server import ServerProcess, batch_stats, minilm_bank
from bench.common.wrk import run_wrk, store_profiles
from bench.load.baselines import Baseline, Infinity, plain_baselines
from bench.load.config import log
from xpeft.engine.batcher import batch_token_budget

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Config:
    profiles: int = 32
    clients: list[int] = field(default_factory=lambda: [32, 128])
    seconds: float = 15.0
    rounds: int = 3
    plain_batch: int = 32
    texts_per_request: int = 1
    adapters: int = 100
    device: str = "cpu"
    threads: int = 0  # torch threads of the server and of the plain encoder; 0: all cores
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    seed: int = 0
    budgets: list[int] = field(default_factory=lambda: [0])  # XPEFT_MAX_BATCH_TOKENS, one server each
    kind: str = "hard"
    backend: str = "auto"  # the server's XPEFT_BACKEND
    baselines: list[str] = field(default_factory=lambda: ["torch", "onnx-int8"])  # plain encoders
    infinity: bool = False  # Infinity over HTTP beside them (--infinity-bin, --infinity-model)


# the Infinity install's own paths, as the report shows them
HIDDEN_PATHS: dict[str, str | None] = {
    "--infinity-bin": "INFINITY_VENV/bin/infinity_emb",
    "--infinity-model": "MODEL_ONNX_DIR",
}
QUICK = {"profiles": 8, "clients": [8], "seconds": 3.0, "rounds": 1}


def profile_server(server: ServerProcess, lines: Path, clients: int, seconds: float, svg: Path) -> dict:
    """py-spy samples the server (every thread, on CPU only) while wrk loads it: once into a
    flame graph, once as collapsed stacks whose leaf frames give the top of the profile."""
    if shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    assert server.proc is not None
    svg.parent.mkdir(parents=True, exist_ok=True)
    for fmt, target in (("flamegraph", svg), ("raw", svg.with_suffix(".txt"))):
        spy = subprocess.Popen(
            ["py-spy", "record", "-p", str(server.proc.pid), "-d", str(round(seconds)), "-r", "200"]
            + ["--threads", "-f", fmt, "-o", str(target)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        run_wrk(server.url, lines, clients, seconds)
        spy.wait(timeout=seconds + 60)
    raw = svg.with_suffix(".txt")
    collapsed = raw.read_text()
    total, top = top_frames(collapsed)
    raw.unlink()
    return {"svg": svg.name, "samples": total, "top": top, "threads": thread_shares(collapsed)}


def _stacks(collapsed: str) -> list[tuple[str, list[str], int]]:
    """``(thread, frames, count)`` per line of py-spy's collapsed stacks, thread ids dropped."""
    out = []
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            frames = stack.split(";")
            out.append((re.sub(r"^thread \(\w+\): ", "", frames[0]), frames, int(count)))
    return out


def thread_shares(collapsed: str) -> dict[str, float]:
    """Each thread's share of the samples on CPU (a thread name's numbered copies apart)."""
    counts: dict[str, int] = {}
    for thread, _, count in _stacks(collapsed):
        counts[thread] = counts.get(thread, 0) + count
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


def top_frames(collapsed: str, limit: int = 25) -> tuple[int, list[dict]]:
    """py-spy's collapsed stacks (``thread;frame;...;leaf count`` per line): the sample count and the
    (thread, leaf frame) pairs with the largest shares, thread ids dropped."""
    counts: dict[str, int] = {}
    for thread, frames, count in _stacks(collapsed):
        key = f"{thread} | {frames[-1]}"
        counts[key] = counts.get(key, 0) + count
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return total, [{"frame": k, "share": v / total} for k, v in ranked]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="rounds per client count (default 3)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per round (default 15)")
    parser.add_argument(
        "--budgets",
        default="0",
        help="comma-separated XPEFT_MAX_BATCH_TOKENS values, one server each (0: the device's default)",
    )
    parser.add_argument("--kind", default="hard", help="the profiles' kind (hard, units, ...)")
    parser.add_argument("--backend", default="auto", help="the server's XPEFT_BACKEND")
    parser.add_argument(
        "--baselines", default="torch,onnx-int8", help="plain encoders to measure against (torch, onnx-int8)"
    )
    parser.add_argument("--clients", default="", help="comma-separated client counts (default 32,128)")
    parser.add_argument("--profiles", type=int, default=0, help="warm profiles (default 32)")
    parser.add_argument("--infinity-bin", type=Path, default=None, help="infinity_emb of its own virtualenv")
    parser.add_argument("--infinity-model", type=Path, default=None, help="a folder holding model.onnx")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--flame",
        type=Path,
        default=None,
        help="after the rounds, profile the server with py-spy under one more wrk round at the first "
        "client count: a flame graph (SVG) here, and its top frames in the results",
    )
    args = parser.parse_args(argv)
    config = Config(device=args.device, threads=args.threads, texts_per_request=args.texts_per_request)
    if args.quick:
        config = Config(**{**asdict(config), **QUICK})
    config.rounds = args.rounds or config.rounds
    config.seconds = args.seconds or config.seconds
    config.budgets = [int(b) for b in args.budgets.split(",")]
    config.kind = args.kind
    config.backend = args.backend
    config.baselines = [b for b in args.baselines.split(",") if b]
    if args.clients:
        config.clients = [int(c) for c in args.clients.split(",")]
    if args.profiles:
        config.profiles = args.profiles
    config.infinity = args.infinity_bin is not None
    if config.infinity and args.infinity_model is None:
        raise SystemExit("--infinity-bin needs --infinity-model (a folder holding model.onnx)")
    out_path = args.out or (
        REPO / ("runs/single-quick.json" if args.quick else "bench/load/results/single.json")
    )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    texts, source = load_texts("")
    _, bank = minilm_bank(config.adapters, config.seed)
    result: dict = {
        "config": asdict(config),
        "texts": source,
        "hardware": hardware(),
        "generator": "wrk",
        "command": shown_command("bench.load.single", argv, HIDDEN_PATHS),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="xpeft-single-") as tmp:
        work = Path(tmp)
        bank_path = work / "bank.safetensors"
        bank.save(bank_path)
        baselines = plain_baselines(config.device, config.plain_batch, threads, config.baselines)
        infinity = None
        if config.infinity:
            infinity = Infinity(args.infinity_bin, args.infinity_model, config.clients[0], work)
            baselines.append(infinity)
        try:
            _serve_and_measure(config, args.flame, bank, bank_path, work, texts, threads, baselines, result)
        finally:
            if infinity is not None:
                infinity.stop()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    return result


def _serve_and_measure(
    config: Config,
    flame: Path | None,
    bank,
    bank_path: Path,
    work: Path,
    texts: list[str],
    threads: int,
    baselines: list[Baseline],
    result: dict,
) -> None:
    """One server per token budget, each measured at every client count against ``baselines``."""
    for budget in config.budgets:
        env = {
            "XPEFT_ACCESS_LOG": "false",
            "XPEFT_LOG_LEVEL": "warning",
            "XPEFT_SQLITE_PATH": str(work / f"store-{budget}.sqlite3"),
            "XPEFT_DEVICE": config.device,
            "XPEFT_TORCH_THREADS": str(threads),
            "XPEFT_MAX_BATCH_SIZE": str(config.max_batch_size),
            "XPEFT_MAX_BATCH_TOKENS": str(budget),
            "XPEFT_MAX_WAIT_MS": str(config.max_wait_ms),
            "XPEFT_BACKEND": config.backend,
        }
        server = ServerProcess(bank_path, "", "", work, env, f"single-{budget}")
        for name in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
            server.env.pop(name, None)
        with server:
            ids = store_profiles(server, bank, config.profiles, config.seed, config.kind)
            lines = request_lines(work, ids, texts, config.texts_per_request)
            for clients in config.clients:
                run = measure(server, baselines, lines, texts, config, clients)
                run["budget"] = batch_token_budget(budget, config.device.split(":")[0])
                result["runs"].append(run)
                log(
                    f"{clients} clients, {run['budget']} tokens: wrk/{run['fastest']} = {run['ratio']:.3f}; "
                    + ", ".join(f"wrk/{k} = {v:.3f}" for k, v in run["ratios"].items())
                )
            if flame is not None and budget == config.budgets[0]:
                result["profile"] = profile_server(server, lines, config.clients[0], config.seconds, flame)


def request_lines(work: Path, ids: list[str], texts: list[str], per_request: int) -> Path:
    """wrk's request file: predicts round-robin over the profiles, ``per_request`` texts each."""
    lines = work / "requests.tsv"
    with lines.open("w") as f:
        for n in range(max(4096, len(ids) * 64)):
            chosen = [texts[(n * per_request + j) % len(texts)] for j in range(per_request)]
            f.write(f"/profiles/{ids[n % len(ids)]}/predict\t{json.dumps({'inputs': chosen})}\n")
    return lines


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(
    server: ServerProcess,
    baselines: list[Baseline],
    lines: Path,
    texts: list[str],
    config: Config,
    clients: int,
) -> dict:
    """Rounds of wrk against the server, each followed by one run of every baseline."""
    rounds = []
    for r in range(config.rounds):
        before = server.metrics()
        cpu0, loop0, busy0 = server.cpu_seconds(), server.loop_cpu_seconds(), machine_busy()
        served = run_wrk(server.url, lines, clients, config.seconds)
        cpu, busy = server.cpu_seconds() - cpu0, machine_busy()
        served["server_cpu_s"] = cpu
        # the event loop's CPU per request: HTTP, routing, validation, batching (not the forward)
        served["loop_ms_per_request"] = (
            (server.loop_cpu_seconds() - loop0) * 1000 / max(1, served["requests"])
        )
        # the machine's busy CPU seconds outside the server, per second of the round: near 0 when
        # only the server and wrk ran
        served["other_busy"] = (
            max(0.0, (busy[0] - busy0[0]) - cpu) / max(1e-9, busy[1] - busy0[1]) * (os.cpu_count() or 1)
        )
        served["server_batches"] = batch_stats(before, server.metrics(), served["wall_s"])
        served["sequences_per_s"] = served["requests_per_s"] * config.texts_per_request
        base = {}
        for baseline in baselines:
            if isinstance(baseline, Infinity):
                baseline.clients = clients
            base[baseline.name] = baseline.run(texts, config.seconds)
        rounds.append({"round": r, "wrk": served, "baselines": base})
        log(
            f"{clients} clients, round {r}: wrk {served['sequences_per_s']:.1f} seq/s "
            f"(p50 {served['latency'].get('p50_ms', 0):.0f} ms, batches of "
            f"{served['server_batches'].get('mean_rows', 0):.1f} rows, worker busy "
            f"{served['server_batches'].get('worker_busy', 0):.0%}, loop {served['loop_ms_per_request']:.2f} ms "
            f"per request, other load {served['other_busy']:.2f} cores), "
            + ", ".join(f"{k} {v['sequences_per_s']:.1f} seq/s" for k, v in base.items())
        )
    served = _spread([x["wrk"]["sequences_per_s"] for x in rounds])
    spread = {b.name: _spread([x["baselines"][b.name]["sequences_per_s"] for x in rounds]) for b in baselines}
    ratios = {name: served["median"] / s["median"] for name, s in spread.items()}
    plain = {name: s for name, s in spread.items() if name != Infinity.name}
    fastest = max(plain, key=lambda name: plain[name]["median"]) if plain else None

    def med(get) -> float:
        return statistics.median(get(x["wrk"]) for x in rounds)

    return {
        "clients": clients,
        "rounds": rounds,
        "wrk": served,
        "baselines": spread,
        "ratios": ratios,
        "fastest": fastest,
        "wrk_seq_per_s": served["median"],
        "plain_seq_per_s": plain[fastest]["median"] if fastest else 0.0,
        "ratio": ratios[fastest] if fastest else 0.0,
        "p50_ms": med(lambda w: w["latency"].get("p50_ms", 0.0)),
        "p99_ms": med(lambda w: w["latency"].get("p99_ms", 0.0)),
        "non_2xx": sum(x["wrk"]["non_2xx"] + x["wrk"]["socket_errors"] for x in rounds),
        "mean_rows": med(lambda w: w["server_batches"].get("mean_rows", 0.0)),
        "worker_busy": med(lambda w: w["server_batches"].get("worker_busy", 0.0)),
        "loop_ms_per_request": med(lambda w: w["loop_ms_per_request"]),
        "other_busy": max(x["wrk"]["other_busy"] for x in rounds),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
