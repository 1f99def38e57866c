"""Fair share of the model worker: the batcher's queue, served across tenants by deficit round robin.

One queue served first come, first served lets one tenant's long inputs hold every other tenant's
requests behind them: a predict of 64 inputs at 512 tokens costs seconds of the worker. Here each
tenant (the job's ``tenant`` key; the engine knows no tokens, the route names it) has its own FIFO,
and the tenants with work take turns by deficit round robin (Shreedhar and Varghese, 1995) on token
cost (rows times padded length, what a forward costs): each turn credits a tenant one quantum of
tokens, the size of one batch, and it is served while its credit covers its next job. A request
larger than a batch is split into parts of at most one batch (its rows, in order; every part
uses the request's one cached profile version), so one tenant's work delays another tenant's
short request by about one batch, however much of it is queued. A request's parts are gathered
back into its own answer, timings and all.

Requests whose cost exceeds a bound (:class:`TooCostly`) are refused before they queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import OrderedDict, deque
from typing import Any, Generic, Protocol, TypeVar


class TooCostly(Exception):
    """One request's token cost (rows times its padded length) is above the bound: the caller
    refuses it (HTTP 413 ``too_many_tokens``) instead of queueing it."""

    def __init__(self, cost: int, limit: int) -> None:
        super().__init__(
            f"this request costs {cost} tokens (inputs times the longest one's padded length), "
            f"above the limit of {limit}: send fewer or shorter inputs per request"
        )
        self.cost = cost
        self.limit = limit


class FairJob(Protocol):
    """What the queue reads of a batcher job."""

    tenant: str
    inputs: list[Any]
    token_ids: list[dict[str, list[int]]] | None
    future: asyncio.Future[Any]
    started: float | None
    run_s: float | None

    @property
    def longest(self) -> int: ...


J = TypeVar("J", bound=FairJob)


def cost(job: FairJob) -> int:
    """Padded tokens of ``job``'s forward: rows times its longest input (one token each before tokenizing)."""
    return len(job.inputs) * max(job.longest, 1)


def check_cost(job: FairJob, limit: int) -> None:
    """Raise :class:`TooCostly` when ``job`` costs more than ``limit`` tokens (0: no bound)."""
    spent = cost(job)
    if limit and spent > limit:
        raise TooCostly(spent, limit)


class FairQueue(Generic[J]):
    """Per-tenant FIFOs served by deficit round robin; the batcher peeks at ``[0]`` and pops left.

    ``quantum`` is the credit of one turn, in tokens: the batch budget, so a part (at most one
    batch) is served in one turn. ``len()`` counts queued parts; :attr:`requests` the requests.
    """

    def __init__(self, quantum: int = 512) -> None:
        self.quantum = max(1, quantum)
        self._ring: OrderedDict[str, deque[J]] = OrderedDict()
        self._deficit: dict[str, int] = {}
        self._credited: set[str] = set()  # tenants credited during their current turn
        self._parts = 0
        self._requests = 0
        self._left: dict[int, list[int]] = {}  # id(part) -> its request's parts still queued

    def __len__(self) -> int:
        return self._parts

    def __bool__(self) -> bool:
        return self._parts > 0

    @property
    def requests(self) -> int:
        """Requests waiting (a split request counts once, until its last part leaves the queue)."""
        return self._requests

    @property
    def tenants(self) -> int:
        """Tenants with queued work."""
        return len(self._ring)

    def append(self, job: J, batch_tokens: int = 0, batch_rows: int = 0) -> None:
        """Queue ``job`` at the end of its tenant's FIFO, split into parts of at most ``batch_tokens``
        padded tokens and ``batch_rows`` rows (0: no bound) when it is larger."""
        parts = split(job, batch_tokens, batch_rows)
        queue = self._ring.get(job.tenant)
        if queue is None:
            queue = self._ring[job.tenant] = deque()
            self._deficit[job.tenant] = 0
        queue.extend(parts)
        self._parts += len(parts)
        self._requests += 1
        left = [len(parts)]  # its parts still queued: the request leaves the queue with its last
        for part in parts:
            self._left[id(part)] = left

    def _turn(self) -> str:
        """The tenant whose head job goes next (credits tenants as their turns come)."""
        while True:
            tenant, queue = next(iter(self._ring.items()))
            if self._deficit[tenant] >= cost(queue[0]):
                return tenant
            if tenant not in self._credited:
                self._credited.add(tenant)
                self._deficit[tenant] += self.quantum
                continue
            self._credited.discard(tenant)  # its turn is over: the next tenant's begins
            self._ring.move_to_end(tenant)

    def __getitem__(self, index: int) -> J:
        if index != 0:
            raise IndexError("only the head of a fair queue can be read")
        if not self._parts:
            raise IndexError("the queue is empty")
        return self._ring[self._turn()][0]

    def popleft(self) -> J:
        """The next job by deficit round robin."""
        if not self._parts:
            raise IndexError("the queue is empty")
        tenant = self._turn()
        queue = self._ring[tenant]
        job = queue.popleft()
        self._deficit[tenant] -= cost(job)
        self._parts -= 1
        left = self._left.pop(id(job))
        left[0] -= 1
        if left[0] == 0:
            self._requests -= 1
        if not queue:  # an idle tenant keeps no credit (DRR's rule)
            del self._ring[tenant]
            del self._deficit[tenant]
            self._credited.discard(tenant)
        return job


def split(job: J, batch_tokens: int, batch_rows: int) -> list[J]:
    """``job`` itself when it fits one batch; otherwise parts of it, each with its own future, whose
    answers are gathered into ``job.future`` in order (and which are cancelled if it is)."""
    longest = max(job.longest, 1)
    per_part = len(job.inputs)
    if batch_tokens:
        per_part = min(per_part, max(1, batch_tokens // longest))
    if batch_rows:
        per_part = min(per_part, batch_rows)
    if per_part >= len(job.inputs):
        return [job]
    loop = job.future.get_loop()
    parts: list[J] = []
    for start in range(0, len(job.inputs), per_part):
        end = start + per_part
        ids = job.token_ids[start:end] if job.token_ids is not None else None
        part = dataclasses.replace(  # type: ignore[type-var]
            job,
            inputs=job.inputs[start:end],
            token_ids=ids,
            future=loop.create_future(),
            started=None,
            run_s=None,
        )
        parts.append(part)
    _gather(job, parts)
    return parts


def _gather(job: J, parts: list[J]) -> None:
    def _part_done(_: asyncio.Future[Any]) -> None:
        if job.future.done():
            return
        failed = next(
            (p for p in parts if p.future.done() and not p.future.cancelled() and p.future.exception()), None
        )
        if failed is not None:
            for p in parts:
                p.future.cancel()  # the request has failed: its other parts need not run
            job.future.set_exception(failed.future.exception())  # type: ignore[arg-type]
            return
        if any(p.future.cancelled() for p in parts):
            job.future.cancel()
            return
        if not all(p.future.done() for p in parts):
            return
        job.started = min((p.started for p in parts if p.started is not None), default=None)
        job.run_s = sum(p.run_s or 0.0 for p in parts)
        job.future.set_result([answer for p in parts for answer in p.future.result()])

    def _request_done(_: asyncio.Future[Any]) -> None:
        if job.future.cancelled():  # the client went (or its deadline passed): drop what is queued
            for p in parts:
                p.future.cancel()

    for part in parts:
        part.future.add_done_callback(_part_done)
    job.future.add_done_callback(_request_done)
