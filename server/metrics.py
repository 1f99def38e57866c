"""Prometheus metrics, registered on a per-app registry so several apps (and tests) never collide.

The registry also carries the standard process, garbage-collector and platform collectors (what
the default registry would have), and no ``*_created`` series: they double every counter's
series for a timestamp that dashboards do not use.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from xpeft.engine.metrics import EngineMetrics
from xpeft.server.errors import StoreUnavailable

T = TypeVar("T")

# Label values every replica exports from the start, at 0: a rate or ratio over them (the
# dashboard's panels, the alerts) then has a series to compute before the first event.
STORE_OPS = ("get", "get_record", "put", "delete", "list", "ping", "seq", "versions")
CACHE_EVENTS = ("hit", "miss", "eviction")
JOB_ENDS = ("succeeded", "failed", "cancelled")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_PROFILE_SERIES = 64  # profiles with their own abstention series; the rest share "other"
disable_created_metrics()  # process-wide in prometheus_client; the server's registries are its only ones


class JobEnds(Collector):
    """``xpeft_train_jobs_ended_total{state}``: jobs that ended, by terminal state, counted by the
    job store itself (whichever process ended them: a trainer, a reaper, a replica), so every
    replica reports the same deployment-wide counts. The server reads them from the store before
    each scrape (:meth:`update`); a scrape while the store does not answer leaves them out."""

    NAME = "xpeft_train_jobs_ended"
    HELP = "training jobs that ended, by state (succeeded, failed, cancelled), counted by the job store"

    def __init__(self) -> None:
        self.counts: dict[str, int] | None = None

    def update(self, counts: dict[str, int] | None) -> None:
        self.counts = counts

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.NAME, self.HELP, labels=["state"])]

    def collect(self) -> list[Metric]:
        if self.counts is None:
            return []
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["state"])
        for state in JOB_ENDS:
            family.add_metric([state], self.counts.get(state, 0))
        return [family]


class Metrics:
    """Every metric the server exports; ``registry`` is what ``GET /metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # The library's own instances (they read /proc, gc and platform when scraped): one per
        # process whatever the number of apps, registered on each app's registry.
        for collector in (PROCESS_COLLECTOR, GC_COLLECTOR, PLATFORM_COLLECTOR):
            r.register(collector)
        self.requests = Counter(
            "xpeft_http_requests_total",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "xpeft_http_request_seconds",
            "HTTP request latency by route template",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "xpeft_batch_rows", "rows (texts) per forward", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_profiles = Histogram(
            "xpeft_batch_profiles", "distinct profiles per forward", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "xpeft_batch_seconds",
            "model worker time per batch (fuse + forward)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "xpeft_queue_wait_seconds",
            "time a predict waited before its batch ran",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("xpeft_queue_depth", "predict requests waiting for a batch", registry=r)
        self.overloaded = Counter(
            "xpeft_overloaded_total", "predicts refused because the queue was full", registry=r
        )
        self.in_flight = Gauge(
            "xpeft_in_flight_requests", "HTTP requests being handled (probes aside)", registry=r
        )
        self.admission_refused = Counter(
            "xpeft_admission_refused_total",
            "requests refused at the door: in_flight (limit reached), draining",
            ["reason"],
            registry=r,
        )
        self.batch_retries = Counter(
            "xpeft_batch_isolations_total", "failed batches re-run one request at a time", registry=r
        )
        self.cache_events = Counter(
            "xpeft_cache_events_total", "cache hits, misses and evictions", ["cache", "event"], registry=r
        )
        self.cache_entries = Gauge("xpeft_cache_entries", "entries held", ["cache"], registry=r)
        self.fused_bytes = Gauge(
            "xpeft_fused_cache_bytes", "bytes of fused adapter weights held on the device", registry=r
        )
        self.fused_profiles = Counter(
            "xpeft_fused_profiles_total", "profiles fused (cache misses of the worker)", registry=r
        )
        self.store_latency = Histogram(
            "xpeft_store_seconds",
            "profile store operation latency",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "xpeft_store_errors_total", "profile store operations that failed", ["op"], registry=r
        )
        self.invalidations = Counter(
            "xpeft_invalidations_total", "change events applied to the caches", ["kind"], registry=r
        )
        self.invalidation_lag = Histogram(
            "xpeft_invalidation_lag_seconds",
            "time from a write in the store to its event reaching this replica",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge("xpeft_model_ready", "1 once the encoder is loaded", registry=r)
        self.kernels = Gauge(
            "xpeft_kernels_info",
            "1 once the model is loaded, labelled with XPEFT_KERNELS, the kernels it chose and those running",
            ["setting", "chosen", "running"],
            registry=r,
        )
        self.backend = Gauge(
            "xpeft_backend_info",
            "1 once the model is loaded, labelled with the encoder backend serving and XPEFT_BACKEND",
            ["backend", "setting"],
            registry=r,
        )
        self.train_jobs = Counter(
            "xpeft_train_jobs_total",
            "training jobs through this replica: queued (202), refused (too_many_jobs), cancelled",
            ["event"],
            registry=r,
        )

        self.abstentions = Counter(
            "xpeft_abstentions_total",
            f"predictions that abstained (none of the profile's labels), by profile: the first "
            f"{MAX_PROFILE_SERIES} profiles that abstain have a series each, later ones share 'other'",
            ["profile"],
            registry=r,
        )
        self._abstaining: set[str] = set()
        self.job_ends = JobEnds()
        r.register(self.job_ends)
        for op in STORE_OPS:
            self.store_errors.labels(op)
        for cache in ("profile", "fused"):
            for event in CACHE_EVENTS:
                self.cache_events.labels(cache, event)
        for reason in ("in_flight", "draining"):
            self.admission_refused.labels(reason)
        for event in ("queued", "refused", "cancelled"):
            self.train_jobs.labels(event)
        self.abstentions.labels("other")

    def count_abstentions(self, profile_id: str, count: int) -> None:
        """Count one request's abstentions under a bounded number of profile series."""
        if not count:
            return
        if profile_id not in self._abstaining and len(self._abstaining) < MAX_PROFILE_SERIES:
            self._abstaining.add(profile_id)
        self.abstentions.labels(profile_id if profile_id in self._abstaining else "other").inc(count)

    def cache_event(self, cache: str, event: str, count: int = 1) -> None:
        if count:
            self.cache_events.labels(cache, event).inc(count)

    async def timed_store(self, op: str, call: Awaitable[T]) -> T:
        """Await a store call, recording its latency, and its failure if it fails."""
        start = time.perf_counter()
        try:
            return await call
        except StoreUnavailable:
            self.store_errors.labels(op).inc()
            raise
        finally:
            self.store_latency.labels(op).observe(time.perf_counter() - start)

    def set_queue_depth_source(self, source: Callable[[], float]) -> None:
        self.queue_depth.set_function(source)

    def engine(self) -> EngineMetrics:
        """The engine's callbacks, recording into these metrics (the engine imports no server)."""

        def batch_ran(seconds: float, rows: int, profiles: int) -> None:
            self.batch_seconds.observe(seconds)
            self.batch_rows.observe(rows)
            self.batch_profiles.observe(profiles)

        def pool_used(nbytes: int, entries: int) -> None:
            self.fused_bytes.set(nbytes)
            self.cache_entries.labels("fused").set(entries)

        return EngineMetrics(
            batch_ran=batch_ran,
            profiles_fused=self.fused_profiles.inc,
            cache_event=lambda event, count: self.cache_event("fused", event, count),
            pool_used=pool_used,
            queue_wait=self.queue_wait.observe,
            overloaded=self.overloaded.inc,
            batch_isolated=self.batch_retries.inc,
        )
