"""The model worker: one thread that owns the encoder, fuses cold profiles and runs each batch.

One thread, because one forward at a time already uses every core (or the whole GPU), and
because the encoder's adapter slots hold per-batch state. The event loop hands it batches
through :meth:`ModelWorker.run_async` and stays free to accept requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles.profile import Profile
from xpeft.profiles.runtime import MultiProfileModel, Prediction, distinct_profiles
from xpeft.server.batcher import Job
from xpeft.server.cache import CacheKey, FusedCache
from xpeft.server.metrics import Metrics


class ModelWorker:
    """Runs batches on the model, with the fused-weight cache in front of fusion."""

    def __init__(self, fused_cache: FusedCache, metrics: Metrics, torch_threads: int | None = None) -> None:
        self.fused_cache = fused_cache
        self.metrics = metrics
        self.model: MultiProfileModel | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpeft-model")
        if torch_threads:
            self.executor.submit(torch.set_num_threads, torch_threads).result()

    def fused_weights(self, profiles: Sequence[Profile], keys: Sequence[CacheKey]) -> list[FusedAdapters]:
        """Cached weights where present; every cold profile fused in one batched call, then cached."""
        assert self.model is not None
        cached = [self.fused_cache.get(key) for key in keys]
        cold = [i for i, f in enumerate(cached) if f is None]
        if cold:
            for i, part in zip(cold, self.model.fuse([profiles[i] for i in cold]), strict=True):
                cached[i] = part
                self.fused_cache.put(keys[i], part)
            self.metrics.fused_profiles.inc(len(cold))
        out = [f for f in cached if f is not None]
        assert len(out) == len(keys), "fusion must return one entry per cold profile"
        return out

    def run(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        """One forward for all jobs (called on the worker thread)."""
        assert self.model is not None, "the model is not loaded"
        start = time.perf_counter()
        requests = [(job.entry.profile, job.inputs) for job in jobs]
        key_of = {id(job.entry.profile): job.entry.key for job in jobs}
        profiles = distinct_profiles(requests)
        fused = self.fused_weights(profiles, [key_of[id(p)] for p in profiles])
        answers = self.model.predict_batch(requests, fused)
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_rows.observe(sum(len(job.inputs) for job in jobs))
        self.metrics.batch_profiles.observe(len(profiles))
        return answers

    async def run_async(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, jobs)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
