"""The micro-batcher: requests of many profiles wait together briefly, then run as one forward.

A batch closes when it holds ``max_batch_size`` rows, when the next request would take it past
``max_batch_tokens`` padded tokens (rows times its longest input: what the forward costs), or
when its first request has waited ``max_wait_s``. A request that fits one batch is never split;
a larger one runs as parts of one batch each (below), and every part is answered from the
request's one version of its profile. With a ``prepare`` step (the model
worker's tokenizer) a request is tokenized on its own thread as it arrives and queued once its
tokens are known, so the model's thread only pads and runs forwards. The queue is bounded in
requests (and each request in rows), so a flood gets ``overloaded`` answers instead of growing
memory. While the worker runs a batch, new requests pile up and form the next one: under load
batches grow by themselves, up to the budget.

Which request goes next is :mod:`xpeft.engine.fair`'s policy: each job names its tenant, tenants
take turns by token cost, and a request larger than one batch runs as parts of at most one batch
(each part answered from the request's one profile version), so one tenant cannot hold the worker
for the others. A request costing more than ``max_request_tokens`` is refused (:class:`TooCostly`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from xpeft.adapters.encoder import TextInput
from xpeft.engine.cache import CachedProfile
from xpeft.engine.fair import FairQueue, TooCostly, check_cost
from xpeft.engine.metrics import EngineMetrics
from xpeft.engine.prediction import Prediction

log = logging.getLogger("xpeft.engine")


class Overloaded(Exception):
    """The queue is full: the server answers 503 ``overloaded``."""


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
    #: the inputs' token ids, once prepared (see :meth:`MicroBatcher.submit_job`); None: not tokenized
    token_ids: list[dict[str, list[int]]] | None = None
    tokenized: float | None = None  # when they were ready and it joined the queue
    #: whose request it is: requests of different tenants share the worker fairly (see xpeft.engine.fair)
    tenant: str = ""

    @property
    def queued(self) -> float:
        """When it joined the queue: once tokenized, or as it arrived without a prepare step."""
        return self.tokenized or self.enqueued

    @property
    def longest(self) -> int:
        """Tokens of its longest input (0 before it is tokenized)."""
        return max((len(f["input_ids"]) for f in self.token_ids), default=0) if self.token_ids else 0


BatchRunner = Callable[[Sequence[Job]], Awaitable[list[list[Prediction]]]]
JobPreparer = Callable[[Job], Awaitable[None]]

#: The default token budget of a batch on each kind of device. On a CPU, 2048 padded tokens (about
#: 50 short texts): with the int8 ONNX backend, a forward of 14 rows costs more per row than one of
#: 40, and the budget sweep in docs/BENCHMARKS.md (``bench.load.single --budgets``) found 2048 and
#: 4096 ahead of 512 at 128 clients and level at 32; a GPU wants the large batches
#: text-embeddings-inference defaults to.
DEFAULT_BATCH_TOKENS = {"cpu": 2048, "cuda": 16384}


def batch_token_budget(setting: int, device_type: str) -> int:
    """``setting`` (``XPEFT_MAX_BATCH_TOKENS``), or the device's default when it is 0."""
    return setting or DEFAULT_BATCH_TOKENS.get(device_type, DEFAULT_BATCH_TOKENS["cuda"])


class MicroBatcher:
    """Collects :class:`Job` s into batches and hands each batch to ``runner`` (one at a time)."""

    def __init__(
        self,
        runner: BatchRunner,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: EngineMetrics | None = None,
        prepare: JobPreparer | None = None,
        max_batch_tokens: int = 0,
        max_request_tokens: int = 0,
    ) -> None:
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics or EngineMetrics()
        self.prepare = prepare
        self._queue: FairQueue[Job] = FairQueue()
        self.max_batch_tokens = max_batch_tokens
        #: one request's padded tokens, above which it is refused (0: no bound)
        self.max_request_tokens = max_request_tokens
        self._preparing: dict[asyncio.Task[None], Job] = {}
        self._arrived = asyncio.Event()

    @property
    def max_batch_tokens(self) -> int:
        """Padded tokens per batch; 0: rows only (the server sets it once the model's device is known)."""
        return self._max_batch_tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, tokens: int) -> None:
        self._max_batch_tokens = tokens
        # a turn's credit is one batch, so a part (at most one batch) is served in one turn
        self._queue.quantum = tokens or self.max_batch_size * 512

    @property
    def depth(self) -> int:
        """Requests waiting: queued, or being tokenized before they queue."""
        return self._queue.requests + len(self._preparing)

    def submit(
        self, entry: CachedProfile, inputs: list[TextInput], tenant: str = ""
    ) -> asyncio.Future[list[Prediction]]:
        """Queue a request; raises :class:`Overloaded` when ``max_queue`` requests already wait."""
        return self.submit_job(entry, inputs, tenant).future

    def submit_job(self, entry: CachedProfile, inputs: list[TextInput], tenant: str = "") -> Job:
        """As :meth:`submit`, returning the job (its timings are set once its batch has run);
        ``tenant`` names whose request it is, for the fair share of the worker."""
        if self.depth >= self.max_queue:
            self.metrics.overloaded()
            raise Overloaded(f"{self.depth} requests are queued (limit {self.max_queue})")
        job = Job(entry, inputs, asyncio.get_running_loop().create_future(), tenant=tenant)
        if self.prepare is None:
            self._enqueue(job)
        else:
            task = asyncio.create_task(self._prepare(job, self.prepare))
            self._preparing[task] = job
            task.add_done_callback(lambda done: self._preparing.pop(done, None))
        return job

    async def _prepare(self, job: Job, prepare: JobPreparer) -> None:
        try:
            await prepare(job)
        except Exception as exc:  # an input the tokenizer refuses fails its own request only
            log.exception("a request failed in the tokenizer")
            self._fail(job, exc)
            return
        finally:  # no longer being tokenized: counted once (as queued, or not at all) from here on
            self._preparing.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if not job.future.done():  # the client may have gone while it was tokenized
            job.tokenized = time.perf_counter()
            self._enqueue(job)

    def _enqueue(self, job: Job) -> None:
        try:
            check_cost(job, self.max_request_tokens)
        except TooCostly as exc:
            self._fail(job, exc)
            return
        self._queue.append(job, self.max_batch_tokens, self.max_batch_size)
        self._arrived.set()

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
        batch: list[Job] = [self._queue.popleft()]
        rows, longest = len(batch[0].inputs), batch[0].longest
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            if self._queue:
                nxt = self._queue[0]
                grown, longer = rows + len(nxt.inputs), max(longest, nxt.longest)
                if grown > self.max_batch_size or (
                    self.max_batch_tokens and grown * longer > self.max_batch_tokens
                ):
                    break  # it opens the next batch: a queued job (a request or a part) is never split
                batch.append(self._queue.popleft())
                rows, longest = grown, longer
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
                self.metrics.queue_wait(started - job.queued)
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
                self.metrics.batch_isolated()
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
        for task, job in list(self._preparing.items()):
            task.cancel()
            self._fail(job, exc)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(exc)
