"""Single-text predicts over warm profiles, from wrk and from the Python generator, against the plain encoder.

    python -m bench.load.single              # 32 profiles, 32 and 128 clients, 3 rounds of 15 s
                                             #   -> bench/load/results/single.json (about 6 min)
    python -m bench.load.single --quick      # smoke run (under a minute) -> runs/single-quick.json
    python -m bench.load.single --device cuda --texts-per-request 8   # a GPU machine
    python -m bench.load.single --flame docs/img/serving-flame.svg      # and a py-spy profile of the server
    python -m bench.load.single --budgets 256,1024,4096,16384 --rounds 1 --out bench/load/results/single-budgets.json
                                             # one server per batch token budget: what chose the default

One ``xpeft serve`` process (embedded SQLite store, the MiniLM default encoder, a random bank of
N = 100) holds ``--profiles`` random hard profiles, each predicted once before timing (warm). Then,
per client count, rounds alternate: wrk (the load generator the numbers come from: a C program,
one thread, so it takes little of the CPU the server needs) sends single-text predicts round-robin
over the profiles; the plain transformers encoder (no adapters, no heads, no HTTP) runs the same
texts in batches of ``--plain-batch`` in this process, on the same number of threads, while the
server idles. The ratio compares medians from the same rounds. ``--kind units`` serves profiles of
the shipped default kind instead. One pass of the Python generator
(bench/common/loadgen.py) per client count is reported beside wrk: on a small machine it shares the
server's cores and shrinks its batches, which is why wrk is the one measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.common.loadgen import PlannedRequest, run_pass
from bench.common.runs import hardware, load_texts
from bench.common.server import ServerProcess, batch_stats, minilm_bank
from bench.common.wrk import run_wrk, store_profiles
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


QUICK = {"profiles": 8, "clients": [8], "seconds": 3.0, "rounds": 1}


class Plain:
    """The plain transformers encoder on the same texts: tokenize, forward, mean-pool, batch by batch."""

    def __init__(self, device: str, batch: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        from xpeft.adapters.encoder import default_model_dir

        path = str(default_model_dir())
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device
        self.batch = batch

    @torch.no_grad()
    def run(self, texts: list[str], seconds: float) -> dict:
        """Batches of the texts, in order, for about ``seconds``; sequences per second."""
        rows, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            chunk = [texts[(i + j) % len(texts)] for j in range(self.batch)]
            i += self.batch
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            out = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
            ((out * mask).sum(1) / mask.sum(1)).cpu()
            rows += len(chunk)
        wall = time.perf_counter() - start
        return {"rows": rows, "wall_s": wall, "sequences_per_s": rows / wall}


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
    total, top = top_frames(raw.read_text())
    raw.unlink()
    return {"svg": svg.name, "samples": total, "top": top}


def top_frames(collapsed: str, limit: int = 25) -> tuple[int, list[dict]]:
    """py-spy's collapsed stacks (``thread;frame;...;leaf count`` per line): the sample count and the
    (thread, leaf frame) pairs with the largest shares, thread ids dropped."""
    counts: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", frames[0])
        key = f"{thread} | {frames[-1]}"
        counts[key] = counts.get(key, 0) + int(count)
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
    out_path = args.out or (
        REPO / ("runs/single-quick.json" if args.quick else "bench/load/results/single.json")
    )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    threads = config.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    texts, source = load_texts("")
    _, bank = minilm_bank(config.adapters, config.seed)
    plain = Plain(config.device, config.plain_batch)
    result: dict = {
        "config": asdict(config),
        "texts": source,
        "hardware": hardware(),
        "generator": "wrk",
        "command": "python -m bench.load.single" + (f" {' '.join(argv)}" if argv else ""),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="xpeft-single-") as tmp:
        work = Path(tmp)
        bank_path = work / "bank.safetensors"
        bank.save(bank_path)
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
            }
            server = ServerProcess(bank_path, "", "", work, env, f"single-{budget}")
            for name in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
                server.env.pop(name, None)
            with server:
                ids = store_profiles(server, bank, config.profiles, config.seed, config.kind)
                lines = request_lines(work, ids, texts, config.texts_per_request)
                for clients in config.clients:
                    run = measure(server, plain, lines, ids, texts, config, clients)
                    run["budget"] = batch_token_budget(budget, config.device.split(":")[0])
                    result["runs"].append(run)
                    log(f"{clients} clients, {run['budget']} tokens: wrk/plain = {run['ratio']:.3f}")
                if args.flame is not None and budget == config.budgets[0]:
                    result["profile"] = profile_server(
                        server, lines, config.clients[0], config.seconds, args.flame
                    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    return result


def request_lines(work: Path, ids: list[str], texts: list[str], per_request: int) -> Path:
    """wrk's request file: predicts round-robin over the profiles, ``per_request`` texts each."""
    lines = work / "requests.tsv"
    with lines.open("w") as f:
        for n in range(max(4096, len(ids) * 64)):
            chosen = [texts[(n * per_request + j) % len(texts)] for j in range(per_request)]
            f.write(f"/profiles/{ids[n % len(ids)]}/predict\t{json.dumps({'inputs': chosen})}\n")
    return lines


def measure(
    server: ServerProcess,
    plain: Plain,
    lines: Path,
    ids: list[str],
    texts: list[str],
    config: Config,
    clients: int,
) -> dict:
    """Rounds of wrk alternating with the plain encoder, then one pass of the Python generator."""
    rounds = []
    for r in range(config.rounds):
        before = server.metrics()
        cpu0 = server.cpu_seconds()
        served = run_wrk(server.url, lines, clients, config.seconds)
        served["server_cpu_s"] = server.cpu_seconds() - cpu0
        served["server_batches"] = batch_stats(before, server.metrics(), served["wall_s"])
        served["sequences_per_s"] = served["requests_per_s"] * config.texts_per_request
        base = plain.run(texts, config.seconds)
        rounds.append({"round": r, "wrk": served, "plain": base})
        log(
            f"{clients} clients, round {r}: wrk {served['sequences_per_s']:.1f} seq/s "
            f"(p50 {served['latency'].get('p50_ms', 0):.0f} ms, batches of "
            f"{served['server_batches'].get('mean_rows', 0):.1f} rows), plain {base['sequences_per_s']:.1f} seq/s"
        )
    plan = [
        PlannedRequest(ids[n % len(ids)], [texts[n % len(texts)]] * config.texts_per_request)
        for n in range(100_000)
    ]
    python_gen = asyncio.run(run_pass(server.url, plan, clients, config.seconds))
    served_med = statistics.median(x["wrk"]["sequences_per_s"] for x in rounds)
    plain_med = statistics.median(x["plain"]["sequences_per_s"] for x in rounds)

    def med(get) -> float:
        return statistics.median(get(x["wrk"]) for x in rounds)

    return {
        "clients": clients,
        "rounds": rounds,
        "wrk_seq_per_s": served_med,
        "plain_seq_per_s": plain_med,
        "ratio": served_med / plain_med,
        "p50_ms": med(lambda w: w["latency"].get("p50_ms", 0.0)),
        "p99_ms": med(lambda w: w["latency"].get("p99_ms", 0.0)),
        "non_2xx": sum(x["wrk"]["non_2xx"] + x["wrk"]["socket_errors"] for x in rounds),
        "mean_rows": med(lambda w: w["server_batches"].get("mean_rows", 0.0)),
        "worker_busy": med(lambda w: w["server_batches"].get("worker_busy", 0.0)),
        "python_generator": {
            "sequences_per_s": python_gen.sequences_per_s,
            "ok": python_gen.ok,
            "sent": python_gen.sent,
            "client_cpu_s": python_gen.client_cpu_s,
        },
    }


if __name__ == "__main__":
    main(sys.argv[1:])
