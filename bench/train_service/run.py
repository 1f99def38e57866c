"""Training as a service, measured: POST -> first prediction of the new profile, and serving while a job trains.

    python -m bench.train_service.run            # full run -> bench/train_service/results/train_service.json
    python -m bench.train_service.run --quick    # smoke run (a few minutes) -> runs/train-service-quick.json
    python -m bench.train_service.run --device cuda --out bench/train_service/results/train_service_gpu.json
    python -m bench.train_service.report         # the JSON -> docs/TRAINING.md

One ``xpeft serve`` process per phase on loopback (embedded SQLite store, the MiniLM default
encoder, a seeded random bank of N = 100), with the trainer process it starts itself.

(a) Time to serve: ``--examples`` SST-2 training sentences (a seeded sample of the shared data's
    ``sst2/train.tsv``) are POSTed as a TSV file with the default method and settings; the clock
    runs from the POST until the first prediction of the new profile answers with the job's
    version (the job polled every 0.1 s). The trainer uses ``--train-threads`` (default: every
    core), since nothing else runs. Repeated ``--repeats`` times on fresh profile ids.
(b) Serving while training: a second server with the trainer's defaults (one thread, nice 10)
    holds ``--profiles`` random warm profiles; rounds alternate wrk (one thread, ``--clients``
    connections, single-text predicts round-robin, bench/common/requests.lua) without a job
    and with one job training (the same SST-2 sample, enough epochs to outlast the window; it is
    cancelled after the window). Throughput and p50/p99 come from wrk; the ratio compares the
    medians of the two kinds of round from the same server process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.common.runs import hardware, load_texts, stderr_log
from bench.common.server import ServerProcess
from bench.common.wrk import run_wrk, store_profiles
from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import load_encoder
from xpeft.training.data import load_dataset

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
AUTH: dict[str, str] = {}  # loopback servers without an admin token (protected mode): writes need none


@dataclass
class Config:
    examples: int = 2000
    repeats: int = 3
    train_threads: int = 0  # 0: every core (phase a only)
    profiles: int = 32
    clients: int = 32
    seconds: float = 20.0
    rounds: int = 3
    adapters: int = 100
    seed: int = 0
    device: str = "cpu"
    data: str = str(DATA)


QUICK = {"examples": 200, "repeats": 1, "profiles": 4, "clients": 4, "seconds": 3.0, "rounds": 1}


log = stderr_log("train-service")


def write_tsv(path: Path, data_path: str, n: int, seed: int) -> int:
    data = load_dataset(data_path).subset(n, seed)
    with path.open("w") as f:
        f.write("sentence\tlabel\n")
        for text, label in zip(data.inputs, data.labels, strict=True):
            f.write(f"{text}\t{label}\n")
    return len(data)


def post_job(client: httpx.Client, profile_id: str, tsv: Path, params: dict | None = None) -> dict:
    response = client.post(
        f"/profiles/{profile_id}/train",
        content=tsv.read_bytes(),
        params=params or {},
        headers={"Content-Type": "text/tab-separated-values", **AUTH},
    )
    response.raise_for_status()
    return response.json()


def time_to_serve(client: httpx.Client, profile_id: str, tsv: Path) -> dict:
    """Seconds from the POST to the first prediction that answers with the job's version."""
    start = time.perf_counter()
    job = post_job(client, profile_id, tsv)
    timeline: dict[str, float] = {}
    while True:
        record = client.get(f"/jobs/{job['id']}", headers=AUTH).json()
        phase = (record.get("progress") or {}).get("phase") or record["state"]
        timeline.setdefault(phase, round(time.perf_counter() - start, 2))
        if record["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)
    if record["state"] != "succeeded":
        raise RuntimeError(f"job failed: {record}")
    version = record["result"]["version"]
    while True:
        answer = client.post(
            f"/profiles/{profile_id}/predict", json={"inputs": ["a gripping film"]}, headers=AUTH
        )
        if answer.status_code == 200 and answer.json()["version"] == version:
            break
        time.sleep(0.02)
    total = time.perf_counter() - start
    return {
        "seconds": total,
        "timeline": timeline,
        "train_seconds": record["result"]["seconds"],
        "eval_accuracy": record["result"]["eval_accuracy"],
        "examples": record["examples"],
        "steps": record["progress"]["total"],
    }


def wait_running(client: httpx.Client, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = client.get(f"/jobs/{job_id}", headers=AUTH).json()
        if (record.get("progress") or {}).get("phase") == "training":
            return
        if record["state"] not in ("queued", "running"):
            raise RuntimeError(f"the background job ended early: {record}")
        time.sleep(0.2)
    raise RuntimeError("the background job did not start training in time")


def server_env(config: Config, work: Path, name: str, extra: dict[str, str]) -> dict[str, str]:
    return {
        "XPEFT_ACCESS_LOG": "false",
        "XPEFT_LOG_LEVEL": "warning",
        "XPEFT_SQLITE_PATH": str(work / f"{name}.sqlite3"),
        "XPEFT_TORCH_THREADS": str(os.cpu_count() or 1),
        "XPEFT_DEVICE": config.device,
        **extra,
    }


def _server(config: Config, bank_path: Path, work: Path, name: str, extra: dict[str, str]) -> ServerProcess:
    server = ServerProcess(bank_path, "", "", work, server_env(config, work, name, extra), name)
    for key in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
        server.env.pop(key, None)
    return server


def phase_a(config: Config, bank_path: Path, tsv: Path, work: Path) -> dict:
    threads = config.train_threads or os.cpu_count() or 1
    runs = []
    server = _server(config, bank_path, work, "time-to-serve", {"XPEFT_TRAIN_THREADS": str(threads)})
    with server, httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
        for r in range(config.repeats):
            run = time_to_serve(client, f"sst2-{r}", tsv)
            runs.append(run)
            log(f"(a) run {r}: POST -> first prediction {run['seconds']:.1f} s ({run['timeline']})")
    seconds = [x["seconds"] for x in runs]
    return {
        "train_threads": threads,
        "runs": runs,
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
    }


def phase_b(config: Config, bank, bank_path: Path, tsv: Path, work: Path) -> dict:
    rounds = []
    with _server(config, bank_path, work, "serve-while-training", {}) as server:
        ids = store_profiles(server, bank, config.profiles, config.seed)
        texts, _ = load_texts("")
        lines = work / "requests.tsv"
        with lines.open("w") as f:
            for n in range(max(4096, len(ids) * 64)):
                f.write(
                    f"/profiles/{ids[n % len(ids)]}/predict\t{json.dumps({'inputs': [texts[n % len(texts)]]})}\n"
                )
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
            # the first job also starts the trainer process: let it load before timing anything
            warm = post_job(client, "warm-trainer", tsv, {"epochs": 1})
            wait_running(client, warm["id"])
            client.delete(f"/jobs/{warm['id']}", headers=AUTH)
            for r in range(config.rounds):
                idle = run_wrk(server.url, lines, config.clients, config.seconds)
                job = post_job(client, f"background-{r}", tsv, {"epochs": 50})
                wait_running(client, job["id"])
                busy = run_wrk(server.url, lines, config.clients, config.seconds)
                progress = client.get(f"/jobs/{job['id']}", headers=AUTH).json().get("progress") or {}
                client.delete(f"/jobs/{job['id']}", headers=AUTH)
                rounds.append(
                    {"round": r, "idle": idle, "training": busy, "job_steps_in_window": progress.get("step")}
                )
                log(
                    f"(b) round {r}: {idle['requests_per_s']:.1f} req/s idle, {busy['requests_per_s']:.1f} while "
                    f"training (p99 {idle['latency'].get('p99_ms', 0):.0f} -> {busy['latency'].get('p99_ms', 0):.0f} ms)"
                )
                time.sleep(2)  # the cancelled job stops at its next step
    idle_rps = statistics.median(x["idle"]["requests_per_s"] for x in rounds)
    busy_rps = statistics.median(x["training"]["requests_per_s"] for x in rounds)

    def pct(kind: str, q: str) -> float:
        return statistics.median(x[kind]["latency"].get(q, float("nan")) for x in rounds)

    return {
        "rounds": rounds,
        "idle_requests_per_s": idle_rps,
        "training_requests_per_s": busy_rps,
        "ratio": busy_rps / idle_rps if idle_rps else float("nan"),
        "idle_p50_ms": pct("idle", "p50_ms"),
        "idle_p99_ms": pct("idle", "p99_ms"),
        "training_p50_ms": pct("training", "p50_ms"),
        "training_p99_ms": pct("training", "p99_ms"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=str(DATA), help="SST-2 train.tsv (sentence, label)")
    parser.add_argument("--train-threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine (server and trainer)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    config = Config(data=args.data, train_threads=args.train_threads, device=args.device)
    if args.quick:
        config = Config(**{**asdict(config), **QUICK})
    out = args.out or (
        REPO
        / (
            "runs/train-service-quick.json"
            if args.quick
            else "bench/train_service/results/train_service.json"
        )
    )
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    encoder = load_encoder("minilm", device="cpu")
    bank = create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        config.adapters,
        seed=config.seed,
        model_name="minilm",
    )
    del encoder
    result: dict = {"config": asdict(config), "hardware": hardware(), "generator": "wrk"}
    result["config"]["data"] = "sst2/train.tsv of the shared evaluation data"
    with tempfile.TemporaryDirectory(prefix="xpeft-train-bench-") as tmp:
        work = Path(tmp)
        bank_path = work / "bank.safetensors"
        bank.save(bank_path)
        tsv = work / "sst2-sample.tsv"
        result["examples"] = write_tsv(tsv, config.data, config.examples, config.seed)
        result["time_to_serve"] = phase_a(config, bank_path, tsv, work)
        result["serving_while_training"] = phase_b(config, bank, bank_path, tsv, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
