"""Single-text predicts over warm profiles, from wrk and from the Python generator, against the plain encoder.

    python -m bench.load.single              # 32 profiles, 32 and 128 clients, 3 rounds of 15 s
                                             #   -> bench/load/results/single.json (about 6 min)
    python -m bench.load.single --quick      # smoke run (under a minute) -> runs/single-quick.json
    python -m bench.load.single --device cuda --texts-per-request 8   # a GPU machine

One ``xpeft serve`` process (embedded SQLite store, the MiniLM default encoder, a random bank of
N = 100) holds ``--profiles`` random hard profiles, each predicted once before timing (warm). Then,
per client count, rounds alternate: wrk (the load generator the numbers come from: a C program,
one thread, so it takes little of the CPU the server needs) sends single-text predicts round-robin
over the profiles; the plain transformers encoder (no adapters, no heads, no HTTP) runs the same
texts in batches of ``--plain-batch`` in this process, on the same number of threads, while the
server idles. The ratio compares medians from the same rounds. One pass of the Python generator
(bench/common/loadgen.py) per client count is reported beside wrk: on a small machine it shares the
server's cores and shrinks its batches, which is why wrk is the one measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    config = Config(device=args.device, threads=args.threads, texts_per_request=args.texts_per_request)
    if args.quick:
        config = Config(**{**asdict(config), **QUICK})
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
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="xpeft-single-") as tmp:
        work = Path(tmp)
        bank_path = work / "bank.safetensors"
        bank.save(bank_path)
        env = {
            "XPEFT_ACCESS_LOG": "false",
            "XPEFT_LOG_LEVEL": "warning",
            "XPEFT_SQLITE_PATH": str(work / "store.sqlite3"),
            "XPEFT_DEVICE": config.device,
            "XPEFT_TORCH_THREADS": str(threads),
            "XPEFT_MAX_BATCH_SIZE": str(config.max_batch_size),
            "XPEFT_MAX_WAIT_MS": str(config.max_wait_ms),
        }
        server = ServerProcess(bank_path, "", "", work, env, "single")
        for name in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
            server.env.pop(name, None)
        with server:
            ids = store_profiles(server, bank, config.profiles, config.seed)
            lines = work / "requests.tsv"
            with lines.open("w") as f:
                for n in range(max(4096, len(ids) * 64)):
                    chosen = [
                        texts[(n * config.texts_per_request + j) % len(texts)]
                        for j in range(config.texts_per_request)
                    ]
                    f.write(f"/profiles/{ids[n % len(ids)]}/predict\t{json.dumps({'inputs': chosen})}\n")
            for clients in config.clients:
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
                result["runs"].append(
                    {
                        "clients": clients,
                        "rounds": rounds,
                        "wrk_seq_per_s": served_med,
                        "plain_seq_per_s": plain_med,
                        "ratio": served_med / plain_med,
                        "python_generator": {
                            "sequences_per_s": python_gen.sequences_per_s,
                            "ok": python_gen.ok,
                            "sent": python_gen.sent,
                            "client_cpu_s": python_gen.client_cpu_s,
                        },
                    }
                )
                log(f"{clients} clients: wrk/plain = {served_med / plain_med:.3f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
