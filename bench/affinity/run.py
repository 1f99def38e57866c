"""Profile affinity benchmark: the repository's nginx in front of two ``xpeft serve`` replicas.

    python -m bench.affinity.run              # full run (about 5 min on 2 cores, needs nginx and wrk)
                                              #   -> bench/affinity/results/affinity.json and the
                                              #   generated section of docs/DEPLOYMENT.md
    python -m bench.affinity.run --quick      # smoke run (about a minute) -> runs/affinity-quick.json
    python -m bench.affinity.report           # re-render the doc section from the JSON

A private redis-server holds ``--profiles`` random hard profiles of the MiniLM default bank,
stored through the store's own ``put``. For each fused-cache size and each balancing method
(``least_conn``, then the profile hash of docker/nginx.conf), two fresh replicas start, wrk sends
a warm-up pass and then a measured pass of the same Zipf request sequence (one wrk thread, a Lua
script reading the paths from a file), and the replicas' ``/metrics`` give the fused-cache hit
rate. nginx's access log says which replica answered each request. Last, under the profile hash,
one replica is killed (SIGKILL) in the middle of a pass: every request nginx logged counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common.runs import Profiles, hardware, load_texts, profile_id
from bench.common.server import ServerProcess, bulk_put, saved_minilm_bank
from bench.common.stats import ZipfSampler
from testsupport.nginx import Entry, Nginx, nginx_binary, render, shares
from testsupport.processes import RedisServer, free_port

if TYPE_CHECKING:
    pass

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LUA = REPO / "bench" / "common" / "requests.lua"  # the same wrk script as the single-text load test


@dataclass
class Config:
    """Everything that decides the numbers; stored in the result JSON."""

    profiles: int = 10_000
    adapters: int = 100
    zipf_s: float = 1.1
    connections: int = 64
    warmup_s: float = 10.0
    measure_s: float = 30.0
    kill_pass_s: float = 20.0
    cache_profiles: list[int] = field(default_factory=lambda: [16, 64])
    sequence: int = 20_000
    seed: int = 0
    server_env: dict[str, str] = field(
        default_factory=lambda: {
            "XPEFT_ACCESS_LOG": "false",
            "XPEFT_LOG_LEVEL": "warning",
            "XPEFT_TORCH_THREADS": "1",
            "XPEFT_MAX_BATCH_SIZE": "64",
            "XPEFT_MAX_WAIT_MS": "5",
        }
    )


QUICK = {
    "profiles": 300,
    "connections": 8,
    "warmup_s": 2.0,
    "measure_s": 4.0,
    "kill_pass_s": 4.0,
    "cache_profiles": [8],
    "sequence": 2000,
}


def log(message: str) -> None:
    print(f"[affinity {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_paths(path: Path, config: Config, texts: list[str]) -> None:
    """One request per line: ``<path>\\t<json body>``, in the Zipf order wrk sends them."""
    picks = ZipfSampler(config.profiles, config.zipf_s, config.seed).sample(config.sequence)
    with path.open("w") as f:
        for n, i in enumerate(picks):
            body = json.dumps({"inputs": [texts[n % len(texts)]]})
            f.write(f"/profiles/{profile_id(int(i))}/predict\t{body}\n")


def wrk(url: str, paths: Path, connections: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "60s",
            "-s",
            str(LUA),
            url,
            "--",
            str(paths),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wrk_summary(output: str) -> dict:
    """wrk's own totals: requests, non-2xx answers, socket errors."""
    requests = re.search(r"(\d+) requests in", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
    }


def run_wrk(url: str, paths: Path, connections: int, seconds: float) -> dict:
    proc = wrk(url, paths, connections, seconds)
    out, _ = proc.communicate(timeout=seconds + 120)
    return wrk_summary(out)


def fused_counts(metrics: dict[str, float]) -> tuple[float, float]:
    return (
        metrics.get("xpeft_cache_events_total{cache=fused,event=hit}", 0.0),
        metrics.get("xpeft_cache_events_total{cache=fused,event=miss}", 0.0),
    )


SETTLE_S = 2.0  # after a pass, until nginx has logged the requests wrk left open
CANCELLED = 499  # nginx's code for a client that closed first: wrk's open requests when a pass ends


def predictions(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.profile_id not in ("", "-")]


@dataclass
class Setup:
    """What every pass shares: the work folder, bank file, store, request file, one cache slot's bytes."""

    work: Path
    bank_path: Path
    redis_url: str
    prefix: str
    paths: Path
    slot_bytes: int


@contextlib.contextmanager
def fleet(
    setup: Setup, name: str, env: dict[str, str], balance: str = "hash"
) -> Iterator[tuple[list[ServerProcess], Nginx]]:
    """Two fresh replicas on the shared store behind the repository's nginx (``balance``), ready;
    all stopped on the way out."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=setup.work))
    replicas = [
        ServerProcess(setup.bank_path, setup.redis_url, setup.prefix, run_dir, env, n) for n in ("r1", "r2")
    ]
    for replica in replicas:
        replica.launch()
    lb: Nginx | None = None
    try:
        for replica in replicas:
            replica.wait_ready()
        port = free_port()
        lb = Nginx(render(run_dir, [r.port for r in replicas], port, balance=balance), port).start()
        yield replicas, lb
    finally:
        if lb is not None:
            lb.stop()
        for replica in replicas:
            replica.stop()


def measure(setup: Setup, config: Config, balance: str, slots: int) -> dict:
    """Two fresh replicas behind nginx with ``balance``; warm-up pass, then the measured pass."""
    paths = setup.paths
    env = {**config.server_env, "XPEFT_FUSED_CACHE_BYTES": str(slots * setup.slot_bytes)}
    with fleet(setup, f"{balance}-{slots}", env, balance) as (replicas, lb):
        run_wrk(lb.url, paths, config.connections, config.warmup_s)
        time.sleep(SETTLE_S)  # the warm-up's last requests (499 when wrk closed) reach the log
        before = [r.metrics() for r in replicas]
        seen = len(lb.log())
        began = time.perf_counter()
        totals = run_wrk(lb.url, paths, config.connections, config.measure_s)
        wall = time.perf_counter() - began
        time.sleep(SETTLE_S)
        after = [r.metrics() for r in replicas]
        entries = predictions(lb.log()[seen:])
        per_replica = []
        hits = misses = 0.0
        for replica, b, a in zip(replicas, before, after, strict=True):
            h = fused_counts(a)[0] - fused_counts(b)[0]
            m = fused_counts(a)[1] - fused_counts(b)[1]
            hits, misses = hits + h, misses + m
            per_replica.append(
                {"port": replica.port, "fused_hit_rate": h / (h + m) if h + m else 0.0, "fused": m}
            )
        split = shares(entries)
        ok = sum(1 for e in entries if e.status == 200)
        result = {
            "balance": balance,
            "cache_profiles": slots,
            "requests": len(entries),
            "ok": ok,
            "statuses": dict(Counter(str(e.status) for e in entries)),
            "cancelled_at_end": sum(1 for e in entries if e.status == CANCELLED),
            "wall_s": wall,
            "requests_per_s": ok / wall,
            "fused_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "profiles_fused": misses,
            "replica_shares": [split.get(str(r.port), 0.0) for r in replicas],
            "max_share": max(split.values()) if split else 0.0,
            "retried": sum(1 for e in entries if len(e.upstreams) > 1),
            "replicas": per_replica,
            "wrk": totals,
        }
        log(
            f"{balance} cache={slots}: {result['requests_per_s']:.1f} req/s, hit rate "
            f"{result['fused_hit_rate']:.3f}, shares {[round(s, 3) for s in result['replica_shares']]}"
        )
        return result


def kill_pass(setup: Setup, config: Config) -> dict:
    """Profile hash; SIGKILL one replica halfway through a pass; count every logged request."""
    paths = setup.paths
    with fleet(setup, "kill", config.server_env) as (replicas, lb):
        run_wrk(lb.url, paths, config.connections, config.warmup_s / 2)
        time.sleep(SETTLE_S)
        seen = len(lb.log())
        proc = wrk(lb.url, paths, config.connections, config.kill_pass_s)
        time.sleep(config.kill_pass_s / 2)
        victim = replicas[1]
        assert victim.proc is not None
        in_flight_before = len(lb.log())
        victim.proc.kill()  # SIGKILL, our own child, by pid
        victim.proc.wait(10)
        out, _ = proc.communicate(timeout=config.kill_pass_s + 120)
        time.sleep(SETTLE_S)
        entries = predictions(lb.log()[seen:])
        after_kill = predictions(lb.log()[in_flight_before:])
        failed = [e for e in entries if e.status not in (200, CANCELLED)]
        result = {
            "requests": len(entries),
            "cancelled_at_end": sum(1 for e in entries if e.status == CANCELLED),
            "failed": len(failed),
            "failed_statuses": dict(Counter(str(e.status) for e in failed)),
            "retried_on_survivor": sum(1 for e in after_kill if len(e.upstreams) > 1 and e.status == 200),
            "answered_after_kill": sum(1 for e in after_kill if e.status == 200),
            "victim_port": victim.port,
            "answered_by_victim_after_kill": sum(1 for e in after_kill if e.replica == str(victim.port)),
            "pass_s": config.kill_pass_s,
            "killed_after_s": config.kill_pass_s / 2,
            "wrk": wrk_summary(out),
        }
        log(
            f"kill: {result['requests']} requests, {result['failed']} failed, {result['retried_on_survivor']} retried"
        )
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run at a tiny size")
    parser.add_argument("--out", type=Path, help="result JSON (default: by mode)")
    parser.add_argument("--doc", type=Path, help="doc to fill (default: docs/DEPLOYMENT.md; none in --quick)")
    args = parser.parse_args(argv)
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            parser.error(
                f"{tool} is not installed (apt-get install {tool if tool == 'wrk' else 'redis-server'})"
            )
    if nginx_binary() is None:
        parser.error("nginx is not installed (apt-get install nginx-light)")
    config = Config(**(QUICK if args.quick else {}))
    out = args.out or (
        REPO / "runs" / "affinity-quick.json" if args.quick else HERE / "results" / "affinity.json"
    )
    doc = args.doc or (None if args.quick else REPO / "docs" / "DEPLOYMENT.md")

    import torch

    from xpeft.engine.slots import slot_nbytes
    from xpeft.server.stores.redis_store import RedisStore

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="xpeft-affinity-"))
    redis_server = RedisServer()
    try:
        bank, bank_path = saved_minilm_bank(work, config.adapters)
        prefix = f"xpeft-affinity-{uuid.uuid4().hex[:8]}"
        log(f"storing {config.profiles} profiles")

        async def fill() -> int:
            store = RedisStore(redis_server.url, prefix=prefix)
            try:
                return await bulk_put(store, Profiles(bank, 0).items(0, config.profiles), bank)
            finally:
                await store.close()

        stored = asyncio.run(fill())
        texts, source = load_texts("")
        paths = work / "paths.txt"
        write_paths(paths, config, texts)
        slot_bytes = slot_nbytes(bank.num_layers, bank.hidden_size, bank.bottleneck, torch.float32)
        setup = Setup(work, bank_path, redis_server.url, prefix, paths, slot_bytes)
        runs = [
            measure(setup, config, balance, slots)
            for slots in config.cache_profiles
            for balance in ("least_conn", "hash")
        ]
        killed = kill_pass(setup, config)
    finally:
        redis_server.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python -m bench.affinity.run" + (" --quick" if args.quick else ""),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware(),
        "config": asdict(config),
        "setup": {"stored": stored, "texts_source": source, "fused_slot_bytes": slot_bytes},
        "runs": runs,
        "kill": killed,
        "duration_s": time.perf_counter() - started,
    }
    from bench.affinity.report import write_section
    from bench.common.docs import save

    save(result, out, doc, write_section, log)


if __name__ == "__main__":
    main()
