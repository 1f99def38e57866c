"""The micro-batcher in isolation: batching across profiles, limits, overload, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from xpeft.engine.batcher import Job, MicroBatcher, Overloaded
from xpeft.engine.cache import CachedProfile
from xpeft.engine.fair import FairQueue, TooCostly
from xpeft.engine.metrics import EngineMetrics


def entry(name: str) -> CachedProfile:
    return CachedProfile(name, 1, object())  # type: ignore[arg-type]  # the runner here never reads it


class Recorder:
    """A runner that records its batches and answers each input with its own text."""

    def __init__(self, delay: float = 0.0, fail_first: bool = False) -> None:
        self.batches: list[list[tuple[str, list]]] = []
        self.delay = delay
        self.fail_first = fail_first
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, jobs: Sequence[Job]) -> list[list]:
        self.batches.append([(job.entry.id, list(job.inputs)) for job in jobs])
        await self.release.wait()
        await asyncio.sleep(self.delay)
        if self.fail_first and len(self.batches) == 1:
            raise RuntimeError("boom")
        return [[f"{job.entry.id}:{x}" for x in job.inputs] for job in jobs]


async def _with_batcher(batcher: MicroBatcher, coro):
    task = asyncio.create_task(batcher.run())
    try:
        return await coro
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_requests_of_many_profiles_share_one_batch() -> None:
    async def body() -> None:
        runner = Recorder()
        batcher = MicroBatcher(runner, max_batch_size=64, max_wait_s=0.05, max_queue=100)

        async def go():
            futures = [batcher.submit(entry(f"p{i}"), [f"t{i}", f"u{i}"]) for i in range(5)]
            return await asyncio.gather(*futures)

        answers = await _with_batcher(batcher, go())
        assert len(runner.batches) == 1 and [j[0] for j in runner.batches[0]] == [f"p{i}" for i in range(5)]
        assert answers == [[f"p{i}:t{i}", f"p{i}:u{i}"] for i in range(5)]  # each back to its own caller

    asyncio.run(body())


def test_batches_respect_max_rows_and_never_split_a_request() -> None:
    async def body() -> None:
        runner = Recorder()
        runner.release.clear()  # hold the first batch so that the rest queue up
        batcher = MicroBatcher(runner, max_batch_size=8, max_wait_s=0.01, max_queue=100)

        async def go():
            futures = [batcher.submit(entry(f"p{i}"), ["x", "y", "z"]) for i in range(7)]
            await asyncio.sleep(0.05)
            runner.release.set()
            return await asyncio.gather(*futures)

        await _with_batcher(batcher, go())
        rows = [sum(len(x) for _, x in batch) for batch in runner.batches]
        assert all(r <= 8 for r in rows) and sum(rows) == 21
        assert rows[1:] == [6, 6, 3]  # 3-row requests: two fit in 8 rows, a third would split
        assert sorted(p for batch in runner.batches for p, _ in batch) == [f"p{i}" for i in range(7)]

    asyncio.run(body())


def test_a_lone_request_waits_at_most_max_wait() -> None:
    async def body() -> None:
        runner = Recorder()
        batcher = MicroBatcher(runner, max_batch_size=64, max_wait_s=0.1, max_queue=10)

        async def go():
            start = time.perf_counter()
            await batcher.submit(entry("p"), ["x"])
            return time.perf_counter() - start

        waited = await _with_batcher(batcher, go())
        assert 0.09 <= waited < 2.0

        # a full batch does not wait
        batcher = MicroBatcher(runner, max_batch_size=2, max_wait_s=5.0, max_queue=10)

        async def full():
            start = time.perf_counter()
            await batcher.submit(entry("p"), ["x", "y"])
            return time.perf_counter() - start

        assert await _with_batcher(batcher, full()) < 1.0

    asyncio.run(body())


def test_full_queue_refuses_with_overloaded() -> None:
    async def body() -> None:
        refused: list[None] = []
        metrics = EngineMetrics(overloaded=lambda: refused.append(None))
        runner = Recorder()
        runner.release.clear()
        batcher = MicroBatcher(runner, max_batch_size=1, max_wait_s=0, max_queue=2, metrics=metrics)

        async def go():
            first = batcher.submit(entry("a"), ["x"])
            await asyncio.sleep(0.02)  # "a" is now running (held); two more fill the queue
            queued = [batcher.submit(entry("b"), ["x"]), batcher.submit(entry("c"), ["x"])]
            assert batcher.depth == 2
            with pytest.raises(Overloaded):
                batcher.submit(entry("d"), ["x"])
            runner.release.set()
            return await asyncio.gather(first, *queued)

        answers = await _with_batcher(batcher, go())
        assert answers == [["a:x"], ["b:x"], ["c:x"]]
        assert len(refused) == 1
        assert batcher.depth == 0

    asyncio.run(body())


def test_a_failed_batch_is_rerun_one_request_at_a_time_and_the_loop_goes_on() -> None:
    """A batch that fails once (say, out of memory) is retried request by request: all answered."""

    async def body() -> None:
        runner = Recorder(fail_first=True)
        isolated: list[None] = []
        metrics = EngineMetrics(batch_isolated=lambda: isolated.append(None))
        batcher = MicroBatcher(runner, max_batch_size=64, max_wait_s=0.01, max_queue=10, metrics=metrics)

        async def go():
            first = [batcher.submit(entry("a"), ["x"]), batcher.submit(entry("b"), ["y"])]
            results = await asyncio.gather(*first, return_exceptions=True)
            good = await batcher.submit(entry("c"), ["z"])
            return results, good

        results, good = await _with_batcher(batcher, go())
        assert results == [["a:x"], ["b:y"]] and good == ["c:z"]
        assert [len(b) for b in runner.batches] == [2, 1, 1, 1]
        assert len(isolated) == 1

    asyncio.run(body())


def test_a_poisoned_request_fails_alone_not_its_batch() -> None:
    """One request that always breaks the model gets the error; the others of its batch do not."""

    class Poisoned(Recorder):
        async def __call__(self, jobs: Sequence[Job]) -> list[list]:
            if any(job.entry.id == "poison" for job in jobs):
                self.batches.append([(job.entry.id, list(job.inputs)) for job in jobs])
                raise RuntimeError("poison")
            return await super().__call__(jobs)

    async def body() -> None:
        runner = Poisoned()
        batcher = MicroBatcher(runner, max_batch_size=64, max_wait_s=0.01, max_queue=10)

        async def go():
            jobs = [batcher.submit(entry(name), [name]) for name in ("a", "poison", "b")]
            return await asyncio.gather(*jobs, return_exceptions=True)

        a, poison, b = await _with_batcher(batcher, go())
        assert a == ["a:a"] and b == ["b:b"]
        assert isinstance(poison, RuntimeError) and str(poison) == "poison"
        assert len(runner.batches[0]) == 3  # they did share a batch first

    asyncio.run(body())


class Tokens:
    """A prepare step that gives each input as many token ids as its text has characters (and
    refuses the text "bad"), after a short pause, as the tokenizer thread would."""

    def __init__(self) -> None:
        self.prepared: list[str] = []

    async def __call__(self, job: Job) -> None:
        await asyncio.sleep(0.001)
        if "bad" in job.inputs:
            raise ValueError("the tokenizer refuses it")
        self.prepared.append(job.entry.id)
        job.token_ids = [{"input_ids": [1] * len(str(x))} for x in job.inputs]


def test_batches_close_at_the_token_budget_with_tokens_known_before_they_queue() -> None:
    async def body() -> None:
        runner, tokens = Recorder(), Tokens()
        runner.release.clear()  # hold the first batch so that the rest queue up
        batcher = MicroBatcher(runner, 64, 0.01, 100, prepare=tokens, max_batch_tokens=60)

        async def go():
            # 10-token inputs: 6 rows fit in 60 tokens; a request of a 30-token and a 1-token input
            # pads to 2 x 30 = 60 by itself
            texts = [["x" * 10]] * 9 + [["y" * 30, "z"]] + [["x" * 10]] * 2
            futures = [batcher.submit(entry(f"p{i}"), t) for i, t in enumerate(texts)]
            await asyncio.sleep(0.05)
            runner.release.set()
            return await asyncio.gather(*futures)

        answers = await _with_batcher(batcher, go())
        assert len(tokens.prepared) == 12  # every request tokenized once, before it queued
        padded = [sum(len(x) for _, x in b) * max(len(t) for _, x in b for t in x) for b in runner.batches]
        assert all(p <= 60 for p in padded)
        assert [p for p, _ in runner.batches[0]] == [f"p{i}" for i in range(6)]  # held: all had queued
        assert ["p9"] in [[p for p, _ in b] for b in runner.batches]  # no 10-token row fits beside it
        assert sum(len(x) for b in runner.batches for _, x in b) == 13
        assert answers[9] == ["p9:" + "y" * 30, "p9:z"]
        assert batcher.depth == 0

    asyncio.run(body())


def test_a_request_the_tokenizer_refuses_fails_alone_and_counts_until_then() -> None:
    async def body() -> None:
        runner, tokens = Recorder(), Tokens()
        batcher = MicroBatcher(runner, 64, 0.01, max_queue=2, prepare=tokens)

        async def go():
            bad = batcher.submit(entry("bad"), ["bad"])
            good = batcher.submit(entry("good"), ["fine"])
            with pytest.raises(Overloaded):  # both count against the queue while they are tokenized
                batcher.submit(entry("third"), ["x"])
            with pytest.raises(ValueError, match="refuses"):
                await bad
            return await good

        assert await _with_batcher(batcher, go()) == ["good:fine"]
        assert [[p for p, _ in b] for b in runner.batches] == [["good"]]

    asyncio.run(body())


def test_a_tokenized_request_counts_once_as_it_queues() -> None:
    """The moment a request leaves the tokenizer for the queue, the depth (what admission and the
    queue gauge read) counts it once, not as both queued and still being tokenized."""

    async def body() -> None:
        runner = Recorder()
        runner.release.clear()
        batcher = MicroBatcher(runner, 64, 10.0, 100, prepare=Tokens())
        seen: list[tuple[int, int]] = []
        enqueue = batcher._enqueue

        def watched(job: Job) -> None:
            enqueue(job)
            seen.append((batcher.depth, batcher._queue.requests))

        batcher._enqueue = watched  # type: ignore[method-assign]
        futures = [batcher.submit(entry(f"p{i}"), ["x"]) for i in range(3)]
        await asyncio.sleep(0.05)
        # three requests wait throughout: the depth stays 3 while they move from tokenizer to queue
        assert seen == [(3, 1), (3, 2), (3, 3)]
        for future in futures:
            future.cancel()

    asyncio.run(body())


def test_shutdown_answers_requests_still_being_tokenized() -> None:
    async def body() -> None:
        gate = asyncio.Event()

        async def slow(job: Job) -> None:
            await gate.wait()

        batcher = MicroBatcher(Recorder(), 64, 0.01, 10, prepare=slow)
        future = batcher.submit(entry("p"), ["x"])
        await asyncio.sleep(0.01)
        batcher.fail_pending(RuntimeError("shutting down"))
        with pytest.raises(RuntimeError, match="shutting down"):
            await asyncio.wait_for(future, 1)
        await asyncio.sleep(0)
        assert batcher.depth == 0

    asyncio.run(body())


# -- fair share across tenants (xpeft.engine.fair) ---------------------------------------------
def test_a_short_request_waits_about_one_batch_behind_another_tenants_long_ones() -> None:
    async def body() -> None:
        runner = Recorder()
        runner.release.clear()
        batcher = MicroBatcher(runner, 64, 0.0, 100, prepare=Tokens(), max_batch_tokens=100)

        async def go():
            # four requests of 16 rows x 50 tokens (800 tokens: eight batches of 100 each) queue first
            heavy = [batcher.submit(entry("heavy"), ["x" * 50] * 16, tenant="heavy") for _ in range(4)]
            await asyncio.sleep(0.01)  # the first heavy part is running, the rest wait
            light = batcher.submit(entry("light"), ["short"], tenant="light")
            await asyncio.sleep(0.01)
            runner.release.set()
            return await asyncio.gather(*heavy), await light

        heavy_answers, light_answer = await _with_batcher(batcher, go())
        assert light_answer == ["light:short"]
        assert all(a == ["heavy:" + "x" * 50] * 16 for a in heavy_answers)  # every row, in order
        tenants = [[t for t, _ in b] for b in runner.batches]  # entry ids: the tenants here
        # the long requests ran in parts of at most one batch (2 rows x 50 tokens)
        assert all(sum(len(x) for t, x in b if t == "heavy") <= 2 for b in runner.batches)
        first_light = next(i for i, b in enumerate(tenants) if "light" in b)
        assert first_light <= 2, tenants[:4]  # at most the running part and one more ahead of it
        assert len(runner.batches) >= 32  # 4 x 8 heavy parts
        assert batcher.depth == 0

    asyncio.run(body())


def test_tenants_take_turns_by_token_cost_not_by_request_count() -> None:
    class J:
        def __init__(self, tenant: str, rows: int, length: int) -> None:
            self.tenant, self.inputs = tenant, ["x"] * rows
            self.token_ids = [{"input_ids": [1] * length}] * rows
            self.future = None  # one-row jobs are never split: the queue reads no future
            self.started = self.run_s = None

        @property
        def longest(self) -> int:
            return len(self.token_ids[0]["input_ids"])

    queue: FairQueue = FairQueue(quantum=100)
    for _ in range(10):
        queue.append(J("a", 1, 100))  # 100 tokens each
    for _ in range(10):
        queue.append(J("b", 1, 10))  # 10 tokens each
    order = [queue.popleft().tenant for _ in range(20)]
    # per turn: a spends its 100 on one job, b spends 100 on ten: b finishes in its first turn
    assert order[:11] == ["a"] + ["b"] * 10
    assert queue.requests == 0 and len(queue) == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_a_request_above_the_token_bound_is_refused_before_it_queues() -> None:
    async def body() -> None:
        runner = Recorder()
        batcher = MicroBatcher(
            runner, 64, 0.0, 100, prepare=Tokens(), max_batch_tokens=100, max_request_tokens=300
        )

        async def go():
            with pytest.raises(TooCostly) as refused:
                await batcher.submit(entry("heavy"), ["x" * 50] * 7, tenant="t")  # 350 tokens
            assert (refused.value.cost, refused.value.limit) == (350, 300)
            return await batcher.submit(entry("heavy"), ["x" * 50] * 6, tenant="t")  # 300: served

        assert len(await _with_batcher(batcher, go())) == 6
        assert sum(len(x) for b in runner.batches for _, x in b) == 6  # the refused one never ran

    asyncio.run(body())


def test_a_cancelled_long_request_drops_its_queued_parts() -> None:
    async def body() -> None:
        runner = Recorder()
        runner.release.clear()
        batcher = MicroBatcher(runner, 64, 0.0, 100, prepare=Tokens(), max_batch_tokens=100)

        async def go():
            heavy = batcher.submit(entry("heavy"), ["x" * 50] * 20, tenant="heavy")  # ten parts
            await asyncio.sleep(0.01)
            heavy.cancel()  # as the route's deadline does
            other = batcher.submit(entry("other"), ["y"], tenant="other")
            await asyncio.sleep(0.01)
            runner.release.set()
            return await other

        assert await _with_batcher(batcher, go()) == ["other:y"]
        heavy_parts = sum(1 for b in runner.batches for t, _ in b if t == "heavy")
        assert heavy_parts == 1  # only the part that was already running
        assert batcher.depth == 0

    asyncio.run(body())
