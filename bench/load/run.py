"""The server load test: Redis-backed ``xpeft serve`` on loopback under Zipf traffic, against offline.

    python -m bench.load.run            # full run (~5 min on 2 cores) -> bench/load/results/load.json,
                                        #   docs/LOAD_TEST.md and docs/img/load_*.png
    python -m bench.load.run --quick    # smoke run (well under a minute) -> runs/load-quick.*

Two phases, each with its own fresh server process and its own Redis key prefix (in Redis
database 13 unless ``--redis-url`` says otherwise), deleted at the end:

1. Throughput: 10,000 random hard profiles (the MiniLM default bank, N = 100) are stored through
   the store's own ``put``; a fresh server gets one pass of Zipf traffic (cold), then the same
   request sequence again in rounds (warm). Between passes, the same process runs the same
   request sequence offline through ``MultiProfileModel.predict_batch`` in batches of the size the
   server just formed (the server's ``/metrics`` say it), with the server's own fused-weight cache
   in front of fusion, so both sides do the same model work and differ only by HTTP, the
   event loop and the micro-batcher. HTTP and offline passes alternate so that load from other
   users of the machine falls on both.
2. Memory: two more fresh servers on one store (glibc's malloc as is, and with a fixed mmap
   threshold) while 1k, then 10k, then 100k profiles are stored (they see every change event);
   after each step, the same Zipf traffic over everything stored to each, then each server's RSS
   and cache occupancy, and Redis ``MEMORY USAGE`` per profile.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common.runs import (
    REPO,
    Profiles,
    git_state,
    hardware,
    load_texts,
)
from bench.common.server import minilm_bank
from bench.load.config import QUICK, Config, log
from bench.load.phases import memory_phase, throughput_phase
from bench.load.report import write_report
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles.synthetic import random_profile
from xpeft.server.model import attach_backend
from xpeft.server.settings import Settings


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few profiles and requests")
    p.add_argument(
        "--out", type=Path, help="result JSON (default bench/load/results/load.json; quick: runs/)"
    )
    p.add_argument(
        "--doc", type=Path, help="report (default docs/LOAD_TEST.md; quick: runs/LOAD_TEST-quick.md)"
    )
    p.add_argument(
        "--redis-url", help="loopback Redis; a database of its own (default redis://127.0.0.1:6379/13)"
    )
    p.add_argument("--concurrency", type=int)
    p.add_argument("--texts-per-request", type=int)
    p.add_argument(
        "--torch-threads", type=int, help="intra-op threads of the server and the offline model (1)"
    )
    p.add_argument("--requests", type=int, dest="requests_per_pass", help="requests per pass")
    p.add_argument("--warm-rounds", type=int)
    p.add_argument("--profiles", type=int, help="profiles for the throughput phase")
    p.add_argument(
        "--memory-stages", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 1000,10000,100000"
    )
    p.add_argument("--texts", help="a .tsv with a 'sentence' column (default: ../shared/data/sst2/dev.tsv)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    config = Config(**(QUICK if args.quick else {}))
    for name in (
        "redis_url",
        "concurrency",
        "torch_threads",
        "texts_per_request",
        "requests_per_pass",
        "warm_rounds",
        "profiles",
        "memory_stages",
        "texts",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = build_config(args)
    out = args.out or (REPO / ("runs/load-quick.json" if args.quick else "bench/load/results/load.json"))
    doc = args.doc or (REPO / ("runs/LOAD_TEST-quick.md" if args.quick else "docs/LOAD_TEST.md"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: servers stop, keys go
    run_id = uuid.uuid4().hex[:10]
    token = uuid.uuid4().hex
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    command = shlex.join(["python", "-m", "bench.load.run", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {
        "command": command,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "hardware": hardware(),
        "git": git_state(),
    }
    torch.set_num_threads(config.torch_threads)  # the offline model; the servers get XPEFT_TORCH_THREADS
    config.server_env = {
        **config.server_env,
        "XPEFT_TORCH_THREADS": str(config.torch_threads),
        "XPEFT_BACKEND": config.backend,
    }
    with tempfile.TemporaryDirectory(prefix="xpeft-load-") as tmp:
        workdir = Path(tmp)
        log(
            "loading the MiniLM encoder and making the bank (as `xpeft bank create --n "
            f"{config.adapters} --seed {config.seed}`)"
        )
        encoder, bank = minilm_bank(config.adapters, config.seed)
        bank_path = bank.save(workdir / "bank.safetensors")
        model = MultiProfileModel(encoder, bank)
        # the offline passes run the encoder backend the servers run, chosen by the same setting
        result["backend"] = attach_backend(
            model, Settings(backend=config.backend, torch_threads=config.torch_threads)
        )
        texts, source = load_texts(config.texts)
        config.texts = source
        start = time.perf_counter()
        profiles = Profiles(bank, max(config.profiles, min(config.memory_stages or [0])))
        log(
            f"generated {len(profiles.kept)} profiles in {time.perf_counter() - start:.1f} s "
            f"({len(profiles.kept[0])} bytes each)"
        )
        result["config"] = asdict(config)
        result["setup"] = {
            "bank_id": bank.bank_id,
            "model_id": encoder.model_id,
            "L": bank.num_layers,
            "N": bank.num_adapters,
            "d": bank.hidden_size,
            "r": bank.bottleneck,
            "k": random_profile(bank, "hard").k,
            "xpm_bytes": len(profiles.kept[0]),
            "texts_source": source,
            "texts_available": len(texts),
            "server_settings": {
                k: v
                for k, v in Settings().model_dump().items()
                if k
                in (
                    "max_batch_size",
                    "max_wait_ms",
                    "max_queue",
                    "profile_cache_size",
                    "fused_cache_bytes",
                    "dtype",
                )
            },
            "server_env": config.server_env,
        }
        if not args.skip_throughput:
            result["throughput"] = throughput_phase(
                config, model, profiles, texts, bank_path, workdir, run_id, token
            )
        if not args.skip_memory:
            result["memory"] = memory_phase(config, model, profiles, texts, bank_path, workdir, run_id, token)
    result["duration_s"] = time.perf_counter() - started
    result["load_avg_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out}")
    write_report(result, doc, out)
    log(f"wrote {doc} in {result['duration_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
