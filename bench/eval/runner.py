"""Runs the plan: builds the banks it needs, then its runs, in one or ``--jobs N`` processes.

Workers are spawned processes with one torch thread each: on a small shared CPU, N
single-threaded processes beat one N-threaded one. Only the parent writes the results file, one
whole fsynced line per finished run, so Ctrl-C, SIGTERM or a kill leave a valid file to resume.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import socket
import sys
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench.eval.banks import BankStore, RandomBankSpec, bank_key, donors, random_bank, resolve, stack_donors
from bench.eval.config import EvalConfig
from bench.eval.plan import RunSpec, build_plan
from bench.eval.results import ResultsFile
from bench.eval.worker import Worker, hardware

_WORKER: Worker | None = None


def _init(config: EvalConfig, data_root: str, model: str, device: str, threads: int, child: bool) -> None:
    global _WORKER
    if child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt stops
    torch.set_num_threads(threads)
    _WORKER = Worker(config, data_root, model, device, {})


def _run(spec: RunSpec, key: str, path: str) -> tuple[str, Any, Any]:
    assert _WORKER is not None
    try:
        _WORKER.bank_files[key] = path
        return "run", spec, _WORKER.run(spec, key)
    except Exception:  # noqa: BLE001 - reported as an error row; the grid goes on
        return "error", spec, traceback.format_exc()


def _donor(key: str, spec: Any, donor: Any) -> tuple[str, Any, Any]:
    assert _WORKER is not None
    try:
        return "donor", (key, donor.index), _WORKER.donor(spec, donor)
    except Exception:  # noqa: BLE001
        return "error", (key, donor.index), traceback.format_exc()


class _Inline:
    """``--jobs 1``: the same calls in this process (no spawn, one encoder)."""

    def __init__(self) -> None:
        self.queued: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.queued.append((fn, args))  # run in next(), so each result is saved before the next starts

    def next(self) -> Any:
        fn, args = self.queued.popleft()
        return fn(*args)

    def close(self, kill: bool = False) -> None:
        pass


class _Pool:
    def __init__(self, jobs: int, initargs: tuple[Any, ...]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(jobs, _init, initargs)
        self.done: queue.Queue[Any] = queue.Queue()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        def failed(exc: BaseException) -> None:
            self.done.put(("error", args[0], repr(exc)))

        self.pool.apply_async(fn, args, callback=self.done.put, error_callback=failed)

    def next(self) -> Any:
        return self.done.get()

    def close(self, kill: bool = False) -> None:
        if kill:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()


class Runner:
    def __init__(
        self,
        config: EvalConfig,
        out: str | Path,
        *,
        data_root: str,
        model: str | None = None,
        device: str | None = None,
        jobs: int = 1,
        threads: int = 1,
        deadline_seconds: float | None = None,
        only_variants: Sequence[str] | None = None,
        only_tasks: Sequence[str] | None = None,
        only_methods: Sequence[str] | None = None,
        work_dir: str | Path = "bench/eval/.work",
        progress: bool = True,
        argv: Sequence[str] = (),
    ) -> None:
        self.config, self.jobs, self.threads, self.argv = config, max(1, jobs), threads, list(argv)
        self.data_root, self.model = data_root, model or config.model
        self.device = device or config.device
        self.results = ResultsFile(out)
        self.store = BankStore(work_dir)
        self.start = time.monotonic()
        self.deadline = self.start + deadline_seconds if deadline_seconds else None
        self.only = (only_variants, only_tasks, only_methods)
        self.progress = progress and sys.stderr.isatty()
        self.session = f"{socket.gethostname()}-{int(time.time())}"
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.ran = self.errors = 0

    # -- the parts -----------------------------------------------------------------------------
    def _say(self, bar: tqdm | None, line: str) -> None:
        (bar.write if bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(line)

    def _fits(self, spec: RunSpec) -> bool:
        """False when the deadline would pass before this run ends (estimated from this session's
        runs of the same task and method, else the slowest of the same task)."""
        if self.deadline is None:
            return True
        same = self.seconds.get((spec.task, spec.method)) or max(
            (v for (t, _), v in self.seconds.items() if t == spec.task),
            key=lambda v: sum(v) / len(v),
            default=[],
        )
        need = (sum(same) / len(same)) * 1.1 + 2.0 if same else 0.0
        return self.deadline - time.monotonic() > need

    def _banks(
        self, pending: list[RunSpec], ex: _Inline | _Pool, worker: Worker
    ) -> dict[str, tuple[str, str]]:
        """Build (or find cached) every bank the pending runs need; spec key -> (bank key, file)."""
        keys: dict[str, tuple[str, str]] = {}
        if not pending:
            return keys
        model_id = worker.encoder.model_id
        written = {r["key"] for r in self.results.rows if r.get("type") == "bank"}
        for spec in pending:
            bs = resolve(self.config, spec.bank, spec.variant)
            key = bank_key(bs, model_id)
            if not self.store.has(key):
                if isinstance(bs, RandomBankSpec):
                    info = {"kind": "random", "spec": bs.__dict__}
                    self.store.save_bank(key, random_bank(worker.encoder, bs, self.model), info)
                else:
                    self._trained(key, bs, ex, worker)
            if key not in written and spec.bank != "none":
                self.results.append(
                    {"type": "bank", "key": key, "session": self.session, **self.store.info(key)}
                )
                written.add(key)
            keys[spec.key] = (key, str(self.store.bank_path(key)))
        return keys

    def _trained(self, key: str, spec: Any, ex: _Inline | _Pool, worker: Worker) -> None:
        everyone = donors(spec, worker.data)
        trained = {d.index: t for d in everyone if (t := self.store.load_donor(key, d.index)) is not None}
        todo = [d for d in everyone if d.index not in trained]
        print(f"trained bank {key}: {len(trained)} donors cached, training {len(todo)}", file=sys.stderr)
        for d in todo:
            ex.submit(_donor, key, spec, d)
        for _ in todo:
            kind, (_, index), value = ex.next()
            if kind == "error":
                raise RuntimeError(f"donor {index} of {key} failed:\n{value}")
            self.store.save_donor(key, index, value)
            trained[index] = value
            s = value["stats"]
            print(
                f"  donor {index}: {s['examples']} examples, train acc {s['train_accuracy']:.3f}, {s['seconds']:.1f}s",
                file=sys.stderr,
            )
        bank, info = stack_donors(worker.encoder, spec, [trained[d.index] for d in everyone], self.model)
        self.store.save_bank(key, bank, info)

    def _session(self, event: str, **extra: Any) -> None:
        self.results.append(
            {
                "type": "session",
                "event": event,
                "session": self.session,
                "time": time.time(),
                "wall_seconds": round(time.monotonic() - self.start, 1),
                **extra,
            }
        )

    # -- the whole run ---------------------------------------------------------------------------
    def run(self) -> str:
        """Every missing run of the plan; returns why it stopped (complete, deadline, interrupted)."""
        torch.set_num_threads(self.threads)
        _init(self.config, self.data_root, self.model, self.device, self.threads, child=False)
        assert _WORKER is not None
        worker = _WORKER
        plan = build_plan(self.config, worker.data, *self.only)
        done = self.results.done()
        pending = [s for s in plan if s.key not in done]
        self._session(
            "start",
            config=self.config.raw,
            argv=self.argv,
            jobs=self.jobs,
            threads_per_job=self.threads,
            hardware=hardware(worker.device),
            model=self.model,
            model_id=worker.encoder.model_id if pending else None,  # no encoder load for nothing
            data_root=self.data_root,
            planned=len(plan),
            done_before=len(plan) - len(pending),
            deadline_seconds=(self.deadline - self.start) if self.deadline else None,
        )
        initargs = (self.config, self.data_root, self.model, self.device, self.threads, True)
        ex: _Inline | _Pool = _Inline() if self.jobs == 1 or not pending else _Pool(self.jobs, initargs)
        reason, bar = "complete", None
        try:
            banks = self._banks(pending, ex, worker)
            bar = (
                tqdm(total=len(plan), initial=len(plan) - len(pending), unit="run") if self.progress else None
            )
            reason = self._dispatch(pending, banks, ex, bar, len(pending))
            ex.close()
        except KeyboardInterrupt:
            reason = "interrupted"
            ex.close(kill=True)
        finally:
            if bar is not None:
                bar.close()
        completed = len(self.results.done() & {s.key for s in plan})
        self._session(
            "end", reason=reason, ran=self.ran, errors=self.errors, completed=completed, planned=len(plan)
        )
        print(
            f"{reason}: {self.ran} runs this session, {completed} of {len(plan)} in {self.results.path}",
            file=sys.stderr,
        )
        return reason

    def _dispatch(
        self,
        pending: list[RunSpec],
        banks: dict[str, tuple[str, str]],
        ex: _Inline | _Pool,
        bar: tqdm | None,
        total: int,
    ) -> str:
        todo, inflight, reason = deque(pending), 0, "complete"
        while todo or inflight:
            while todo and inflight < self.jobs and reason == "complete":
                if not self._fits(todo[0]):
                    reason = "deadline"
                    self._say(bar, f"deadline: not starting {todo[0].key} or the {len(todo) - 1} after it")
                    break
                spec = todo.popleft()
                ex.submit(_run, spec, *banks[spec.key])
                inflight += 1
            if not inflight:
                break
            kind, spec, value = ex.next()
            inflight -= 1
            if kind == "error":
                self.errors += 1
                self._say(bar, f"error in {getattr(spec, 'key', spec)}:\n{value}")
                self.results.append(
                    {
                        "type": "error",
                        "key": getattr(spec, "key", str(spec)),
                        "session": self.session,
                        "error": str(value)[-2000:],
                    }
                )
                continue
            value.update(session=self.session, finished_at=time.time())
            self.results.append(value)
            self.ran += 1
            self.seconds[(spec.task, spec.method)].append(value["train_seconds"] + value["eval_seconds"])
            if bar is not None:
                bar.update(1)
            self._say(
                bar,
                f"[{self.ran + self.errors}/{total}] {spec.key} acc={value['accuracy']:.4f} train={value['train_seconds']:.1f}s "
                f"bytes={value['bytes']['total']}",
            )
        return reason
