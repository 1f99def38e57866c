"""Fair share of the model worker: one tenant's heavy predicts against another tenant's short ones.

A tenant (``acme``) keeps ``--heavy-clients`` predicts of 64 inputs × 4,096 characters in flight
on a profile with ``max_length`` 512 (each one 64 × 512 padded tokens: the most one request may
cost by default), while a second tenant (``beta``) sends one-text predicts one after another.
Before the heavy load starts, the short predicts run alone for a baseline. Everything is bounded:
at most ``--light`` short predicts and ``--seconds`` of heavy load. Over HTTP on loopback, against
one ``xpeft serve`` it starts itself on a private redis-server.

    python -m bench.reliability.fairness --out bench/reliability/results/fairness.json
    python -m bench.reliability.fairness --quick       # a few requests, to try the script

``python -m bench.reliability.report`` renders its section of docs/RELIABILITY.md from that file.
Target: the short predicts' p99 at most 2 s with no timeouts, and the heavy tenant still served.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from testsupport.processes import RedisServer, ServerProcess, bearer

ADMIN = "fair-admin-token-4c2e91"
HEAVY, LIGHT = "fair-acme-token-7b1d30", "fair-beta-token-e58a2f"
WORDS = [
    "the",
    "service",
    "was",
    "slow",
    "but",
    "the",
    "staff",
    "were",
    "kind",
    "and",
    "the",
    "food",
    "arrived",
    "warm",
]


def _long_text(n_chars: int, seed: int) -> str:
    words, size, i = [], 0, seed
    while size < n_chars:
        word = WORDS[i % len(WORDS)]
        words.append(word)
        size += len(word) + 1
        i += 7
    return " ".join(words)[:n_chars]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _summary(latencies: list[float]) -> dict:
    return {
        "n": len(latencies),
        "p50_s": round(_pct(latencies, 0.5), 4),
        "p99_s": round(_pct(latencies, 0.99), 4),
        "max_s": round(max(latencies), 4) if latencies else None,
        "mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def _light_round(url: str, n: int, stop: threading.Event | None = None) -> tuple[list[float], dict[str, int]]:
    """``n`` one-text predicts of the light tenant, one after another."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    with httpx.Client(timeout=60) as client:
        for i in range(n):
            if stop is not None and stop.is_set():
                break
            began = time.perf_counter()
            try:
                r = client.post(
                    f"{url}/profiles/beta-light/predict",
                    json={"inputs": [f"a short review number {i}"]},
                    headers=bearer(LIGHT),
                )
                key = (
                    str(r.status_code) if r.status_code == 200 else f"{r.status_code} {r.json().get('error')}"
                )
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            latencies.append(time.perf_counter() - began)
            statuses[key] = statuses.get(key, 0) + 1
            time.sleep(0.05)
    return latencies, statuses


def run_fairness(url: str, heavy_clients: int, inputs: int, chars: int, light: int, seconds: float) -> dict:
    """The scenario against a running server whose profiles ``acme-heavy`` and ``beta-light`` exist."""
    baseline, base_statuses = _light_round(url, max(5, light // 10))
    texts = [_long_text(chars, seed) for seed in range(inputs)]
    stop = threading.Event()
    heavy_lat: list[float] = []
    heavy_statuses: dict[str, int] = {}
    lock = threading.Lock()

    def heavy() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    r = client.post(
                        f"{url}/profiles/acme-heavy/predict", json={"inputs": texts}, headers=bearer(HEAVY)
                    )
                    key = (
                        str(r.status_code)
                        if r.status_code == 200
                        else f"{r.status_code} {r.json().get('error')}"
                    )
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                with lock:
                    heavy_lat.append(time.perf_counter() - began)
                    heavy_statuses[key] = heavy_statuses.get(key, 0) + 1

    threads = [threading.Thread(target=heavy, daemon=True) for _ in range(heavy_clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.0)  # the heavy requests are queued and running before the short ones start
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    latencies, statuses = _light_round(url, light, stop)
    stop.set()
    timer.cancel()
    for t in threads:
        t.join(150)
    return {
        "heavy_clients": heavy_clients,
        "heavy_inputs": inputs,
        "heavy_chars": chars,
        "load_s": round(time.monotonic() - began, 1),
        "baseline": {**_summary(baseline), "statuses": base_statuses},
        "light": {**_summary(latencies), "statuses": statuses},
        "heavy": {**_summary(heavy_lat), "statuses": heavy_statuses},
    }


def fairness_section(r: dict) -> list[str]:
    """docs/RELIABILITY.md's section of this scenario."""
    b, lt, h = r["baseline"], r["light"], r["heavy"]
    ok = lt["statuses"].get("200", 0)
    return [
        "## Fair share of the model worker",
        "",
        f"Tenant `acme` keeps {r['heavy_clients']} predicts of {r['heavy_inputs']} inputs × "
        f"{r['heavy_chars']:,} characters in flight (a profile with `max_length` 512: "
        f"{r['heavy_inputs']} × 512 padded tokens each) while tenant `beta` sends one-text predicts one "
        f"after another, for {r['load_s']:g} s (bench/reliability/fairness.py, `{r['command']}`, "
        f"{r['machine']['cpus']} CPUs, torch {r['machine']['torch']}, {r['started']}).",
        "",
        "| | requests | p50 | p99 | max | answers |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| `beta` alone | {b['n']} | {b['p50_s']:.3f} s | {b['p99_s']:.3f} s | {b['max_s']:.3f} s | "
        f"{_answers(b['statuses'])} |",
        f"| `beta` beside `acme` | {lt['n']} | {lt['p50_s']:.3f} s | {lt['p99_s']:.3f} s | {lt['max_s']:.3f} s | "
        f"{_answers(lt['statuses'])} |",
        f"| `acme` (heavy) | {h['n']} | {h['p50_s']:.3f} s | {h['p99_s']:.3f} s | {h['max_s']:.3f} s | "
        f"{_answers(h['statuses'])} |",
        "",
        f"{ok} of {lt['n']} short predicts answered 200 beside the heavy load. Tenants take turns by "
        "token cost (deficit round robin, one batch of credit a turn) and a request larger than a batch "
        "runs as parts of at most one batch, so `beta` waits behind at most about one batch of `acme`'s.",
        "",
    ]


def _answers(statuses: dict[str, int]) -> str:
    return ", ".join(f"{n} × {code}" for code, n in sorted(statuses.items())) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/reliability/results/fairness.json"))
    parser.add_argument("--quick", action="store_true", help="a few requests and seconds, to try the script")
    parser.add_argument("--heavy-clients", type=int, default=4)
    parser.add_argument("--light", type=int, default=200, help="short predicts at most")
    parser.add_argument("--seconds", type=float, default=120.0, help="heavy load at most")
    args = parser.parse_args()
    import torch  # noqa: PLC0415 - the report imports this module for its section, without torch

    from bench.common.server import saved_minilm_bank  # noqa: PLC0415
    from xpeft.profiles import format as xpm  # noqa: PLC0415
    from xpeft.profiles.synthetic import random_profile  # noqa: PLC0415

    light, seconds, inputs = (20, 15.0, 16) if args.quick else (args.light, args.seconds, 64)
    torch.set_num_threads(1)
    bank, bank_path = saved_minilm_bank(Path(tempfile.mkdtemp(prefix="xpeft-fairness-")), 100)
    workdir = bank_path.parent
    store = RedisServer()
    server = ServerProcess(
        "fair",
        {
            "XPEFT_REDIS_URL": store.url,
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_PREDICT_TOKENS": json.dumps({HEAVY: ["acme-"], LIGHT: ["beta-"]}),
            "XPEFT_ACCESS_LOG": "false",
            "XPEFT_TORCH_THREADS": str(max(1, (os.cpu_count() or 2) - 1)),
        },
        bank_path,
        workdir / "server.log",
    )
    results: dict = {
        "command": "python -m bench.reliability.fairness" + (" --quick" if args.quick else ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    try:
        server.start()
        server.wait_ready()
        for pid, length in (("acme-heavy", 512), ("beta-light", 128)):
            data = xpm.encode(random_profile(bank, seed=len(pid), max_length=length))
            httpx.put(f"{server.url}/profiles/{pid}", content=data, headers=bearer(ADMIN)).raise_for_status()
        results.update(run_fairness(server.url, args.heavy_clients, inputs, 4096, light, seconds))
    finally:
        server.stop()
        store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    lt = results["light"]
    print(
        f"light p99 {lt['p99_s']:.3f} s, answers {lt['statuses']}; heavy answers {results['heavy']['statuses']}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
