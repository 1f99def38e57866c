"""The long reliability run (too slow for CI): every scenario of testsupport/scenarios (and the
boundary cases of bench/reliability/boundary.py) with longer phases and more traffic than tests/reliability, against ``xpeft serve`` processes and private
redis-servers it starts itself on loopback. Writes one JSON file; ``python -m bench.reliability.report``
renders docs/RELIABILITY.md from it.

    python -m bench.reliability.run --out bench/reliability/results/cpu.json      # about 5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
import torch

from bench.reliability.boundary import run_boundary
from testsupport.processes import RedisServer, ServerProcess
from testsupport.scenarios.hostile import run_hostile
from testsupport.scenarios.outage import OutageConfig, run_outage
from testsupport.scenarios.overload import run_overload
from testsupport.scenarios.shutdown import run_shutdown
from testsupport.scenarios.updates import run_updates
from testsupport.scenarios.xpm_fuzz import corpus
from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import load_encoder
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.slots import head_memory_bound
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile
from xpeft.server.settings import Settings

ADMIN = "bench-admin-token"
API = "bench-api-token-52c1"
TENANTS = ("bench-acme-token-8f2d61", "bench-beta-token-3c90ae")
MAX_PENDING_JOBS = 20
HEADER_TIMEOUT_S = 2.0
TEXTS = ["a gripping, beautifully acted film", "the plot is dull and the jokes are stale"]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def _strip(result: dict) -> dict:
    """Per-request records stay out of the JSON file (they are summarised in it)."""
    return {k: v for k, v in result.items() if k not in ("outcomes", "probe_outcomes")}


def scenario_fuzz(server: ServerProcess, redis_url: str, prefix: str, bank, encoder, n: int) -> dict:
    valid = xpm.encode(random_profile(bank, seed=42))
    other = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=20, seed=7
    )
    small = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=10, seed=1
    )
    foreign = [
        xpm.encode(random_profile(b, kind, seed=i))
        for i, (b, kind) in enumerate([(other, "hard"), (other, "soft"), (small, "hard"), (small, "soft")])
    ]
    mutants = corpus(valid, foreign, n=n, seed=1)
    by_category: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    accepted = {}
    started = time.monotonic()
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=30) as client:
        for i, mutant in enumerate(mutants):
            response = client.put(f"/profiles/fz-{i}", content=mutant.data)
            by_category[mutant.category][str(response.status_code)] += 1
            if response.is_success:
                accepted[f"fz-{i}"] = mutant.data
        took = time.monotonic() - started
        predicted = collections.Counter(
            client.post(
                f"/profiles/{pid}/predict", json={"inputs": ["x " * 1000, ["a " * 300, "b " * 300]]}
            ).status_code
            for pid in accepted
        )
    store = redis.Redis.from_url(redis_url)
    tag = "{" + prefix + "}"
    stored = {k.decode().split(":profile:", 1)[1] for k in store.scan_iter(f"{tag}:profile:fz-*", count=1000)}
    same_bytes = all(store.hget(f"{tag}:profile:{pid}", "data") == data for pid, data in accepted.items())
    store.close()
    statuses = collections.Counter()
    for counts in by_category.values():
        statuses.update(counts)
    return {
        "uploads": len(mutants),
        "seconds": round(took, 1),
        "statuses": dict(statuses),
        "by_category": {k: dict(v) for k, v in sorted(by_category.items())},
        "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
        "accepted": len(accepted),
        "stored": len(stored),
        "stored_equals_accepted": stored == set(accepted),
        "stored_bytes_equal": same_bytes,
        "accepted_predicts": dict(predicted),
        "alive": server.alive(),
    }


def scenario_updates(main: ServerProcess, replica: ServerProcess, bank, encoder, puts: int) -> dict:
    files = [xpm.encode(random_profile(bank, seed=900 + i, labels=["neg", "pos"])) for i in range(8)]
    offline = MultiProfileModel(encoder, bank)
    expected = [[p.scores for p in offline.predict(xpm.decode(data, bank), TEXTS)] for data in files]
    result = asyncio.run(
        run_updates(
            main.url,
            [main.url, replica.url],
            _auth(),
            _auth(),
            "cu-1",
            files,
            expected,
            TEXTS,
            puts=puts,
            put_gap_s=0.2,
        )
    )
    return {
        **result,
        "mismatches": len(result["mismatches"]),
        "answers_by_replica": {
            name: result["answers_by_replica"][s.url] for name, s in (("main", main), ("replica", replica))
        },
    }


def scenario_overload(
    server: ServerProcess, bank, settings: dict, levels: list[int], rounds: int, per_round: int
) -> dict:
    ids = [f"ov-{i}" for i in range(8)]
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=30) as client:
        for i, pid in enumerate(ids):
            client.put(f"/profiles/{pid}", content=xpm.encode(random_profile(bank, seed=70 + i)))
    out = {"settings": settings, "levels": []}
    for concurrency in levels:
        result = asyncio.run(
            run_overload(
                server.url,
                server.pid,
                _auth(),
                ids,
                rounds=rounds,
                requests_per_round=per_round,
                concurrency=concurrency,
            )
        )
        out["levels"].append({"concurrency": concurrency, **_strip(result)})
    return out


def scenario_shutdown(bank_path: Path, workdir: Path, bank, drain_timeout_s: float, in_flight: int) -> dict:
    env = {
        "XPEFT_SQLITE_PATH": str(workdir / f"drain-{drain_timeout_s}.sqlite3"),
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_MAX_BATCH_SIZE": "2",
        "XPEFT_MAX_WAIT_MS": "0",
        "XPEFT_DRAIN_TIMEOUT_S": str(drain_timeout_s),
        "XPEFT_DRAIN_DELAY_S": "0.5",
        "XPEFT_ACCESS_LOG": "false",
        "XPEFT_MAX_QUEUE": "1024",
    }
    server = ServerProcess(
        f"drain-{drain_timeout_s}", env, bank_path, workdir / f"drain-{drain_timeout_s}.log"
    )
    server.start()
    server.wait_ready()
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=30) as client:
        client.put("/profiles/drain-1", content=xpm.encode(random_profile(bank, seed=8)))
    result = asyncio.run(run_shutdown(server, _auth(), "drain-1", in_flight=in_flight, texts=4))
    server.stop()
    return {"drain_timeout_s": drain_timeout_s, "drain_delay_s": 0.5, **_strip(result)}


def scenario_hostile(server: ServerProcess, bank, rounds: int) -> dict:
    """A 1 MB body of 500k items, stalled unauthenticated requests, slow headers (testsupport/scenarios/hostile.py)."""
    with httpx.Client(base_url=server.url, headers=_auth(), timeout=30) as client:
        assert client.put("/profiles/hostile-1", content=xpm.encode(random_profile(bank, seed=9))).is_success
    return run_hostile(server.url, server.port, "hostile-1", ADMIN, HEADER_TIMEOUT_S, rounds)


def scenario_boundary(server: ServerProcess, redis_url: str, prefix: str, bank, make_profile) -> dict:
    """The second attack's classes of case (bench/reliability/boundary.py)."""
    settings = Settings()
    limits = {
        "max_pending_jobs": MAX_PENDING_JOBS,
        "max_labels": settings.max_labels,
        "num_adapters": bank.num_adapters,
        "head_bound_bytes": head_memory_bound(
            settings.head_cache_bytes, settings.max_batch_size, settings.max_labels, bank.hidden_size
        ),
    }
    return run_boundary(
        server.url, server.port, server.pid, ADMIN, TENANTS, make_profile, redis_url, prefix, limits
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/reliability/results/cpu.json"))
    parser.add_argument("--quick", action="store_true", help="short phases, for trying the script")
    args = parser.parse_args()
    quick = args.quick
    workdir = Path(tempfile.mkdtemp(prefix="xpeft-reliability-"))
    torch.set_num_threads(1)
    encoder = load_encoder("minilm", device="cpu")
    bank = create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        num_adapters=100,
        seed=0,
        model_name="minilm",
    )
    bank_path = bank.save(workdir / "bank.safetensors")
    shared_redis, outage_redis = RedisServer(), RedisServer(aof=True)
    prefix = "bench"
    common = {
        "XPEFT_REDIS_URL": shared_redis.url,
        "XPEFT_REDIS_PREFIX": prefix,
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_ACCESS_LOG": "false",
    }
    overload_settings = {"XPEFT_MAX_QUEUE": "32", "XPEFT_MAX_IN_FLIGHT": "64", "XPEFT_MAX_BATCH_SIZE": "16"}
    servers = {
        "main": ServerProcess(
            "main",
            {
                **common,
                "XPEFT_API_TOKEN": API,  # reads need a token: the stalled unauthenticated case
                "XPEFT_PREDICT_TOKENS": json.dumps({TENANTS[0]: ["acme-"], TENANTS[1]: ["beta-"]}),
                "XPEFT_MAX_PENDING_JOBS": str(MAX_PENDING_JOBS),  # no trainer: jobs stay queued
                "XPEFT_MAX_TEXT_CHARS": "4096",
                "XPEFT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            },
            bank_path,
            workdir / "main.log",
        ),
        "replica": ServerProcess(
            "replica", {**common, **overload_settings}, bank_path, workdir / "replica.log"
        ),
        "outage": ServerProcess(
            "outage",
            {
                "XPEFT_REDIS_URL": outage_redis.url,
                "XPEFT_REDIS_PREFIX": "outage",
                "XPEFT_ADMIN_TOKEN": ADMIN,
                "XPEFT_STORE_TIMEOUT_S": "0.5",
                "XPEFT_REQUEST_TIMEOUT_S": "3",
                "XPEFT_VERSION_CHECK_S": "0.5",
                "XPEFT_ACCESS_LOG": "false",
            },
            bank_path,
            workdir / "outage.log",
        ),
    }
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "redis": redis.Redis.from_url(shared_redis.url).info("server")["redis_version"],
        },
        "command": "python -m bench.reliability.run" + (" --quick" if quick else ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            server.wait_ready()

        def make_profile(seed: int, labels: list[str]) -> bytes:
            return xpm.encode(random_profile(bank, seed=seed, labels=labels))

        steps = [
            (
                "outage",
                lambda: _strip(
                    asyncio.run(
                        run_outage(
                            servers["outage"].url,
                            outage_redis,
                            "outage",
                            ADMIN,
                            make_profile,
                            servers["outage"].pid,
                            OutageConfig(2, 2, 2, 2, 3) if quick else OutageConfig(5, 5, 5, 5, 10),
                        )
                    )
                ),
            ),
            (
                "fuzz",
                lambda: scenario_fuzz(
                    servers["main"], shared_redis.url, prefix, bank, encoder, 1000 if quick else 3000
                ),
            ),
            (
                "updates",
                lambda: scenario_updates(
                    servers["main"], servers["replica"], bank, encoder, 10 if quick else 60
                ),
            ),
            (
                "overload",
                lambda: scenario_overload(
                    servers["replica"],
                    bank,
                    overload_settings,
                    [64] if quick else [64, 256],
                    2 if quick else 4,
                    200 if quick else 400,
                ),
            ),
            ("hostile", lambda: scenario_hostile(servers["main"], bank, 5 if quick else 20)),
            (
                "boundary",
                lambda: scenario_boundary(servers["main"], shared_redis.url, prefix, bank, make_profile),
            ),
            ("shutdown", lambda: scenario_shutdown(bank_path, workdir, bank, 60.0, 20)),
            ("shutdown_deadline", lambda: scenario_shutdown(bank_path, workdir, bank, 1.0, 40)),
        ]
        for name, step in steps:
            began = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
            results[name] = {**step(), "scenario_s": round(time.monotonic() - began, 1)}
        results["servers_alive_at_end"] = {name: s.alive() for name, s in servers.items()}
        results["machine"]["load_avg_at_end"] = os.getloadavg()
    finally:
        for server in servers.values():
            server.stop()
        shared_redis.close()
        outage_redis.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
