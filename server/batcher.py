"""The micro-batcher: requests of many profiles wait together briefly, then run as one forward.

A batch closes when it holds ``max_batch_size`` rows or its first request has waited
``max_wait_s``. Requests are never split, so one request is answered by one forward and one
version of its profile. The queue is bounded in requests (and each request in rows), so a flood
gets ``overloaded`` answers instead of growing memory. While the worker runs a batch, new
requests pile up and form the next one: under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from xpeft.adapters.encoder import TextInput
from xpeft.profiles.runtime import Prediction
from xpeft.server.cache import CachedProfile
from xpeft.server.metrics import Metrics

log = logging.getLogger("xpeft.server")


class Overloaded(Exception):
    """The queue is full: the caller answers 503 ``overloaded``."""


@dataclass
class Job:
    """One predict request: its profile version, its inputs, and where its answer goes."""

    entry: CachedProfile
    inputs: list[TextInput]
    future: asyncio.Future[list[Prediction]]
    enqueued: float = field(default_factory=time.perf_counter)
    # set when its batch runs: when it left the queue, and how long that batch's run took
    started: float | None = None
    run_s: float | None = None


BatchRunner = Callable[[Sequence[Job]], Awaitable[list[list[Prediction]]]]


class MicroBatcher:
    """Collects :class:`Job` s into batches and hands each batch to ``runner`` (one at a time)."""

    def __init__(
        self,
        runner: BatchRunner,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        if metrics is not None:
            metrics.set_queue_depth_source(lambda: len(self._queue))

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, entry: CachedProfile, inputs: list[TextInput]) -> asyncio.Future[list[Prediction]]:
        """Queue a request; raises :class:`Overloaded` when ``max_queue`` requests already wait."""
        return self.submit_job(entry, inputs).future

    def submit_job(self, entry: CachedProfile, inputs: list[TextInput]) -> Job:
        """As :meth:`submit`, returning the job (its timings are set once its batch has run)."""
        if len(self._queue) >= self.max_queue:
            if self.metrics is not None:
                self.metrics.overloaded.inc()
            raise Overloaded(f"{len(self._queue)} requests are queued (limit {self.max_queue})")
        job = Job(entry, inputs, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return job

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        self._arrived.clear()
        try:
            await asyncio.wait_for(self._arrived.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def next_batch(self) -> list[Job]:
        """Wait for the first request, then fill the batch until it is full or the wait is over."""
        while not self._queue:
            await self._wait_for_arrival(None)
        batch = [self._queue.popleft()]
        rows = len(batch[0].inputs)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            if self._queue:
                if rows + len(self._queue[0].inputs) > self.max_batch_size:
                    break  # it opens the next batch: requests are never split
                job = self._queue.popleft()
                batch.append(job)
                rows += len(job.inputs)
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        return batch

    async def run(self) -> None:
        """The batching loop; runs until cancelled."""
        while True:
            batch = [job for job in await self.next_batch() if not job.future.done()]  # done: client gone
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started = started
                if self.metrics is not None:
                    self.metrics.queue_wait.observe(started - job.enqueued)
            try:
                answers = await self.runner(batch)
                for job in batch:
                    job.run_s = time.perf_counter() - started
            except Exception as exc:
                if len(batch) == 1:
                    log.exception("a request failed in the model worker")
                    self._fail(batch[0], exc)
                    continue
                # One request must not sink the others of its batch (another tenant's, say): run
                # each alone, so only the one that fails by itself gets the error.
                log.warning(
                    "batch of %d requests failed (%s: %s); running them one by one",
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                if self.metrics is not None:
                    self.metrics.batch_retries.inc()
                await self._run_alone(batch)
                continue
            for job, answer in zip(batch, answers, strict=True):
                if not job.future.done():
                    job.future.set_result(answer)

    async def _run_alone(self, batch: list[Job]) -> None:
        for job in batch:
            if job.future.done():
                continue
            try:
                alone = time.perf_counter()
                (answer,) = await self.runner([job])
                job.run_s = time.perf_counter() - alone
            except Exception as exc:
                log.exception("a request failed in the model worker")
                self._fail(job, exc)
            else:
                if not job.future.done():
                    job.future.set_result(answer)

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        if not job.future.done():
            job.future.set_exception(exc)

    def fail_pending(self, exc: BaseException) -> None:
        """On shutdown: answer every queued request with ``exc``."""
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(exc)
