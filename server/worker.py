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

from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles.profile import Profile
from xpeft.profiles.runtime import MultiProfileModel, Prediction
from xpeft.server.batcher import Job
from xpeft.server.cache import CacheKey, FusedCache
from xpeft.server.metrics import Metrics

MIN_TOKENS = 4  # [CLS] a [SEP] b [SEP] needs at least 3 for the tokenizer to truncate a pair


def token_limit(encoder: AdapterEncoder) -> int:
    """The most tokens one input may have: the encoder's positions (and its tokenizer's own limit)."""
    candidates = [
        getattr(encoder.model.config, "max_position_embeddings", None),
        getattr(encoder.tokenizer, "model_max_length", None),
    ]
    usable = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]  # 1e30: "no limit"
    return min(usable) if usable else 512


class ModelWorker:
    """Runs batches on the model, with the fused-weight cache in front of fusion."""

    def __init__(self, fused_cache: FusedCache, metrics: Metrics, torch_threads: int | None = None) -> None:
        self.fused_cache = fused_cache
        self.metrics = metrics
        self.model: MultiProfileModel | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpeft-model")
        if torch_threads:
            self.executor.submit(torch.set_num_threads, torch_threads).result()

    def fuse_cached(self, profiles: Sequence[Profile], keys: dict[int, CacheKey]) -> list[FusedAdapters]:
        """Cached weights where present; every cold profile fused in one batched call, then cached."""
        assert self.model is not None
        out: list[FusedAdapters | None] = [self.fused_cache.get(keys[id(p)]) for p in profiles]
        cold = [i for i, f in enumerate(out) if f is None]
        if cold:
            for i, part in zip(cold, self.model.fuse([profiles[i] for i in cold]), strict=True):
                out[i] = part
                self.fused_cache.put(keys[id(profiles[i])], part)
            self.metrics.fused_profiles.inc(len(cold))
        return out  # type: ignore[return-value]

    def run(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        """One forward for all jobs (called on the worker thread)."""
        assert self.model is not None, "the model is not loaded"
        start = time.perf_counter()
        limit = token_limit(self.model.encoder)
        for job in jobs:
            # A valid file may declare max_length from 1 to 65536; the encoder has a fixed number of
            # positions, and a tokenizer does not truncate at all below its special tokens (3 for a
            # pair), so either end would send an input too long and fail. Clamping is idempotent
            # and only this thread reads the field, so the decoded profile is updated in place.
            declared = job.entry.profile.max_length
            usable = min(max(int(declared), MIN_TOKENS), limit)
            if type(declared) is not int or declared != usable:
                job.entry.profile.max_length = usable
        keys = {id(job.entry.profile): job.entry.key for job in jobs}
        answers = self.model.predict_batch(
            [(job.entry.profile, job.inputs) for job in jobs],
            fuse=lambda profiles: self.fuse_cached(profiles, keys),
        )
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_rows.observe(sum(len(job.inputs) for job in jobs))
        self.metrics.batch_profiles.observe(len(keys))
        return answers

    async def run_async(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, jobs)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
