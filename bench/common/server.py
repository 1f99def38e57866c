"""Processes and stores the load test owns: an ``xpeft serve`` child on loopback, its Redis key area.

Every key the test writes lives under its own prefix, in a Redis database of its own (``/13`` by
default), and :meth:`RedisArea.cleanup` deletes exactly those keys; nothing else in Redis is
touched. Server processes are started and stopped by pid, never by name.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.common.loadgen import check_loopback
from xpeft.adapters.bank import AdapterBank, create_random_bank
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.server.stores.redis_store import RedisStore
from xpeft.server.uploads import validate_profile

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and VmHWM (peak) of a process from /proc, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process (its threads included) from /proc/<pid>/stat, or of
    one of its threads (``thread``: its id; the process id is the main thread's)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to ``{"name{label=value,...}": value}`` (samples, including _sum/_count)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                continue  # buckets are not needed; sums and counts are
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


class ServerProcess:
    """``python -m xpeft.cli serve`` (i.e. ``xpeft serve``) on a free loopback port.

    Settings go through ``XPEFT_*`` variables, exactly as a deployment sets them. Output goes to
    a log file in ``workdir`` (a pipe nobody reads could block the server).
    """

    def __init__(
        self, bank_path: Path, redis_url: str, prefix: str, workdir: Path, env: dict[str, str], name: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        check_loopback(self.url)
        self.log_path = workdir / f"server-{name}.log"
        self.env = {
            **os.environ,
            **env,
            "XPEFT_BANK": str(bank_path),
            "XPEFT_REDIS_URL": redis_url,
            "XPEFT_REDIS_PREFIX": prefix,
            "XPEFT_HOST": "127.0.0.1",
            "XPEFT_PORT": str(self.port),
        }
        self.command = [sys.executable, "-m", "xpeft.cli", "serve"]
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0
        self._started = 0.0

    def launch(self) -> ServerProcess:
        """Start the process without waiting (several servers may then load their models together)."""
        self._started = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def wait_ready(self) -> ServerProcess:
        """Poll ``/readyz`` until 200 (model loaded, store answers); bounded by ``READY_TIMEOUT_S``."""
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready within {READY_TIMEOUT_S} s; see {self.log_path}")
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - self._started
        return self

    def start(self) -> ServerProcess:
        return self.launch().wait_ready()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory(self) -> dict[str, int]:
        return rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def loop_cpu_seconds(self) -> float:
        """The main thread's CPU seconds: the event loop's (HTTP, routing, batching), not the model's."""
        return cpu_seconds(self.pid, self.pid)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False).text)

    def log_tail(self, lines: int = 20) -> list[str]:
        """The server's last log lines (warnings and errors: it logs at warning level)."""
        return self.log_path.read_text(errors="replace").splitlines()[-lines:]

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL after 15 s; only our own child, by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def batch_stats(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Batches the server ran between two /metrics scrapes: count, mean rows and distinct profiles, and
    ``worker_busy``, the share of the pass's wall time the model worker spent in batches."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("xpeft_batch_rows_count")
    fused = delta("xpeft_fused_profiles_total")
    hits, misses = (
        delta("xpeft_cache_events_total{cache=fused,event=hit}"),
        delta("xpeft_cache_events_total{cache=fused,event=miss}"),
    )
    return {
        "batches": batches,
        "mean_rows": delta("xpeft_batch_rows_sum") / batches if batches else 0.0,
        "mean_distinct_profiles": delta("xpeft_batch_profiles_sum") / batches if batches else 0.0,
        "mean_batch_ms": 1000 * delta("xpeft_batch_seconds_sum") / batches if batches else 0.0,
        "worker_busy": delta("xpeft_batch_seconds_sum") / wall_s if wall_s else 0.0,
        "mean_queue_wait_ms": 1000
        * delta("xpeft_queue_wait_seconds_sum")
        / max(1.0, delta("xpeft_queue_wait_seconds_count")),
        "profiles_fused": fused,
        "fused_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "overloaded": delta("xpeft_overloaded_total"),
    }


class RedisArea:
    """The test's own keys: ``{prefix}:*`` in one Redis database, deleted afterwards."""

    def __init__(self, url: str, prefix: str) -> None:
        check_loopback(url.replace("redis://", "http://", 1))
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url)
        self.pattern = "{" + prefix + "}*"

    def count_keys(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=self.pattern, count=1000))

    def cleanup(self) -> int:
        """Delete every key under the prefix, in batches; returns how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=self.pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self.client.delete(*batch)
                batch = []
        if batch:
            deleted += self.client.delete(*batch)
        return deleted

    def memory_per_profile(self, store: RedisStore, ids: list[str], stored: int) -> dict[str, float]:
        """``MEMORY USAGE`` (exact: SAMPLES 0) of sampled profile hashes, plus each id's share of the index."""
        per_key = [int(self.client.memory_usage(store.key(i), samples=0) or 0) for i in ids]
        index = int(self.client.memory_usage(store.ids_key, samples=0) or 0)
        data = [len(self.client.hget(store.key(i), "data") or b"") for i in ids[:50]]
        meta = [len(self.client.hget(store.key(i), "meta") or b"") for i in ids[:50]]
        mean_hash = sum(per_key) / len(per_key)
        return {
            "sampled_keys": len(ids),
            "hash_bytes_mean": mean_hash,
            "hash_bytes_max": max(per_key),
            "index_bytes_total": index,
            "index_bytes_per_profile": index / stored,
            "bytes_per_profile": mean_hash + index / stored,
            "xpm_bytes_mean": sum(data) / len(data) if data else 0.0,
            "meta_bytes_mean": sum(meta) / len(meta) if meta else 0.0,
            "encoding": self.client.object("encoding", store.key(ids[0])).decode(),
        }

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def server_info(self) -> dict[str, str]:
        info = self.client.info("server")
        config = self.client.config_get("hash-max-listpack-value")  # hash-max-ziplist-value before Redis 7
        return {
            "redis_version": str(info.get("redis_version")),
            "hash_max_listpack_value": str(config.get("hash-max-listpack-value", "n/a")),
        }


async def bulk_put(
    store: RedisStore,
    items: Iterable[tuple[str, bytes]],
    bank: AdapterBank,
    window: int = 64,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Store profiles through ``RedisStore.put`` (the PUT endpoint's own call), ``window`` at a time.

    The metadata comes from the PUT handler's own ``validate_profile`` (it decodes and checks the
    whole file first), then the same Lua script, version counter and change event as a PUT; only
    HTTP is skipped. The runner checks that an HTTP PUT stores identical ``data`` and ``meta``.
    """
    done = 0
    pending: list[asyncio.Task] = []
    for profile_id, data in items:
        pending.append(asyncio.ensure_future(store.put(profile_id, data, validate_profile(data, bank))))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            done += len(pending)
            pending = []
            if progress is not None:
                progress(done)
    if pending:
        await asyncio.gather(*pending)
        done += len(pending)
    return done


def minilm_bank(adapters: int, seed: int) -> tuple[AdapterEncoder, AdapterBank]:
    """The MiniLM default encoder and a seeded random bank for it, as ``xpeft bank create --n N --seed S``."""
    encoder = load_encoder("minilm", device="cpu")
    bank = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, adapters, seed=seed, model_name="minilm"
    )
    return encoder, bank


def saved_minilm_bank(work: Path, adapters: int, seed: int = 0) -> tuple[AdapterBank, Path]:
    """:func:`minilm_bank`'s bank (what the image serves), saved under ``work``."""
    _, bank = minilm_bank(adapters, seed)
    return bank, bank.save(work / "bank.safetensors")
