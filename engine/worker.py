"""The model worker: one thread that owns the encoder, fuses cold profiles and runs each batch.

One thread, because one forward at a time already uses every core (or the whole GPU), and
because the encoder's adapter slots hold per-batch state. The event loop hands it batches
through :meth:`ModelWorker.run_async` and stays free to accept requests meanwhile. Requests are
tokenized as they arrive on a thread of their own (:meth:`ModelWorker.prepare`; the fast
tokenizer releases the GIL), overlapping the forward that runs, so the model's thread only pads
the batch's token ids and runs it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from xpeft.engine.batcher import Job, MicroBatcher, batch_token_budget
from xpeft.engine.cache import FusedCache, Reservation
from xpeft.engine.graphs import GraphRunner, graphs_wanted
from xpeft.engine.metrics import EngineMetrics
from xpeft.engine.runtime import MultiProfileModel, Prediction, SlotBatch, distinct_profiles
from xpeft.profiles.profile import Profile


class ModelWorker:
    """Runs batches on the model, with the fused-weight cache in front of fusion."""

    def __init__(
        self, fused_cache: FusedCache, metrics: EngineMetrics | None = None, torch_threads: int | None = None
    ) -> None:
        self.fused_cache = fused_cache
        self.metrics = metrics or EngineMetrics()
        self.model: MultiProfileModel | None = None
        #: where the model runs (``cpu``, ``cuda``), read once: per request it would walk the parameters
        self.device_type = "unknown"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpeft-model")
        self.tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpeft-tokenize")
        self._stopped = False
        #: requests waiting for the tokenizer thread, and whether a call of it is under way
        self._to_tokenize: list[tuple[Job, asyncio.Future[None]]] = []
        self._tokenizing: asyncio.Task[None] | None = None
        if torch_threads:
            self.executor.submit(torch.set_num_threads, torch_threads).result()

    def attach(
        self,
        model: MultiProfileModel,
        cuda_graphs: bool | None = None,
        max_batch: int = 64,
        batcher: MicroBatcher | None = None,
        max_batch_tokens: int = 0,
    ) -> None:
        """Take ``model``: allocate the fused-weight pool for its shape, and its CUDA graphs if wanted;
        give ``batcher`` the device's token budget (``max_batch_tokens``, 0: the device's default)."""
        enc = model.encoder
        if batcher is not None:
            batcher.max_batch_tokens = batch_token_budget(max_batch_tokens, enc.device.type)
        pool = self.fused_cache.attach(
            model.bank.num_layers, model.bank.hidden_size, model.bank.bottleneck, enc.device, enc.dtype
        )
        wanted = pool is not None and graphs_wanted(cuda_graphs, enc.device)
        model.graphs = GraphRunner(enc, pool.weights, max_batch) if wanted and pool is not None else None
        self.device_type = enc.device.type
        self.model = model

    def _fill(self, held: Reservation, profiles: Sequence[Profile]) -> SlotBatch:
        assert self.model is not None
        if held.cold:
            self.metrics.profiles_fused(len(held.cold))
        return held.fill(self.model, profiles)

    def run(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        """One forward for all jobs (called on the worker thread), its slots pinned throughout."""
        assert self.model is not None, "the model is not loaded"
        if self.fused_cache.pool is None:  # a model set directly rather than through attach()
            self.attach(self.model)
        start = time.perf_counter()
        requests = [(job.entry.profile, job.inputs) for job in jobs]
        key_of = {id(job.entry.profile): job.entry.key for job in jobs}
        profiles = distinct_profiles(requests)
        ids = [f for job in jobs for f in job.token_ids or ()]
        tokenized = ids if all(job.token_ids is not None for job in jobs) else None
        with self.fused_cache.reserve([key_of[id(p)] for p in profiles]) as held:
            answers = self.model.predict_batch(requests, self._fill(held, profiles), tokenized)
        rows = sum(len(job.inputs) for job in jobs)
        self.metrics.batch_ran(time.perf_counter() - start, rows, len(profiles))
        return answers

    async def run_async(self, jobs: Sequence[Job]) -> list[list[Prediction]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run, jobs)

    async def prepare(self, job: Job) -> None:
        """Tokenize ``job``'s inputs on the tokenizer thread (the batcher's ``prepare`` step); before
        the model is loaded they stay untokenized and the forward tokenizes them.

        Requests that arrive while the tokenizer runs wait for its next call, which takes them all
        at once: one hop to the thread and one tokenizer call per group rather than per request.
        """
        if self.model is None or self._stopped:  # shutting down: the queue's drain answers it
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._to_tokenize.append((job, done))
        if self._tokenizing is None:
            self._tokenizing = loop.create_task(self._tokenize_waiting())
        await done

    async def _tokenize_waiting(self) -> None:
        """Tokenize the waiting requests, group by group, until none waits."""
        loop = asyncio.get_running_loop()
        try:
            while self._to_tokenize and self.model is not None and not self._stopped:
                group, self._to_tokenize = self._to_tokenize, []
                jobs = [job for job, _ in group]
                try:
                    ids = await loop.run_in_executor(self.tokenizer, token_ids_of, self.model, jobs)
                except Exception:  # an input the tokenizer refuses fails its own request only
                    await self._tokenize_alone(group)
                    continue
                for (job, done), each in zip(group, ids, strict=True):
                    job.token_ids = each
                    if not done.done():
                        done.set_result(None)
        finally:
            self._tokenizing = None
            for _, done in self._to_tokenize:  # stopped: they run untokenized (or are drained)
                if not done.done():
                    done.set_result(None)
            self._to_tokenize = []

    async def _tokenize_alone(self, group: list[tuple[Job, asyncio.Future[None]]]) -> None:
        loop = asyncio.get_running_loop()
        for job, done in group:
            try:
                (job.token_ids,) = await loop.run_in_executor(self.tokenizer, token_ids_of, self.model, [job])
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(None)

    def shutdown(self) -> None:
        self._stopped = True
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.tokenizer.shutdown(wait=False, cancel_futures=True)


def token_ids_of(model: MultiProfileModel | None, jobs: Sequence[Job]) -> list[list[dict[str, list[int]]]]:
    """Each job's inputs' token ids, each at its profile's length, from one tokenizer call."""
    assert model is not None
    inputs = [text for job in jobs for text in job.inputs]
    lengths = [job.entry.profile.max_length for job in jobs for _ in job.inputs]
    flat = model.encoder.token_ids(inputs, lengths)
    out, start = [], 0
    for job in jobs:
        out.append(flat[start : start + len(job.inputs)])
        start += len(job.inputs)
    return out
