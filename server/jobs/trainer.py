"""Running one job in a trainer process: claim it, train, score, store as ``PUT`` stores, record.

The encoder and the bank load once per process (:class:`TrainerContext`). A heartbeat thread
refreshes the job's lease and progress every ``train_heartbeat_s``; it also reads the cancel flag,
which the per-step callback turns into :class:`Cancelled`. The profile is written only at the
end, by the store's own atomic ``put`` after the same validation ``PUT`` runs, and only while
this worker still owns the job: a worker that lost its lease (it hung, or was presumed dead)
stores nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import Profile
from xpeft.server.jobs.records import JobStore, worker_token
from xpeft.server.jobs.request import CONFIG_FIELDS, check_trainable, decode_examples, split
from xpeft.server.settings import Settings
from xpeft.server.stores.base import Condition
from xpeft.training.data import check_dataset
from xpeft.training.evaluate import evaluate
from xpeft.training.train import train_profile
from xpeft.training.train_config import TrainConfig

log = logging.getLogger("xpeft.worker")


class Cancelled(Exception):
    """Raised from the step callback when the job's record asks it to stop."""


@dataclass
class TrainerContext:
    settings: Settings
    jobs: JobStore
    bank: AdapterBank
    model: MultiProfileModel | None = None

    def get_model(self) -> MultiProfileModel:
        if self.model is None:
            from xpeft.server.model import build_model

            self.model = build_model(self.settings, self.bank)
        return self.model


CONTEXT: TrainerContext | None = None  # set once by the worker process (server/jobs/worker.py)
RUNNING: dict[str, _Progress] = {}  # job id -> its progress, while this process trains it


class _Progress:
    """The latest step record, ETA, and the heartbeat thread that publishes them."""

    def __init__(self, jobs: JobStore, job_id: str, worker: str, every_s: float) -> None:
        self.jobs, self.job_id, self.worker, self.every_s = jobs, job_id, worker, every_s
        self.state: dict = {"step": 0, "total": None, "phase": "loading"}
        self.cancel = False
        self.lost = False
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"xpeft-heartbeat-{job_id}", daemon=True)
        self._thread.start()

    def on_step(self, record: dict) -> None:
        elapsed = time.monotonic() - self.started
        step, total = record["step"], record["total"]
        self.state = {
            "phase": "training",
            "step": step,
            "total": total,
            "loss": round(record["loss"], 5),
            "train_accuracy": round(record["train_accuracy"], 5),
            "elapsed_s": round(elapsed, 2),
            "eta_s": round(elapsed / step * (total - step), 2),
        }
        if self.cancel or self.lost:
            raise Cancelled()

    def phase(self, name: str) -> None:
        self.state = {**self.state, "phase": name}
        self.publish()

    def publish(self) -> dict | None:
        rec = self.jobs.heartbeat(self.job_id, self.worker, self.state)
        if rec is None:
            self.lost = True
        elif rec.get("cancel_requested"):
            self.cancel = True
        return rec

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.publish()
            except Exception:  # a store hiccup: the next beat retries; the lease allows for it
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_job(job_id: str) -> None:
    """The queue's task: run ``job_id`` if it is still queued; every outcome ends in the record."""
    ctx = CONTEXT
    assert ctx is not None, "run_job runs in a trainer process (xpeft worker)"
    worker = worker_token()
    # a message is one turn: it runs the job whose tenant's turn it is, this one or another's
    record = ctx.jobs.claim_next(worker)
    if record is None:
        log.info("job %s: nothing is queued any more (cancelled, or taken); skipped", job_id)
        return
    job_id = record["id"]
    log.info("job %s: training profile %s", job_id, record["profile_id"])
    progress = _Progress(ctx.jobs, job_id, worker, ctx.settings.train_heartbeat_s)
    RUNNING[job_id] = progress
    try:
        fields = _train_and_store(ctx, record, progress)
        state = "succeeded"
    except Cancelled:
        state, fields = "cancelled", {}
    except XPeftError as exc:
        state, fields = "failed", {"error": {"code": exc.code, "message": exc.message}}
    except Exception as exc:
        log.exception("job %s failed", job_id)
        state, fields = "failed", {"error": {"code": "internal_error", "message": type(exc).__name__}}
    finally:
        progress.close()
        RUNNING.pop(job_id, None)
    if progress.lost or not ctx.jobs.finish(job_id, worker, state, progress=progress.state, **fields):
        log.warning("job %s: this worker lost it (lease expired or cancelled); its result is dropped", job_id)
    else:
        log.info("job %s: %s", job_id, state)


def requeue_running(requeue: Callable[[str], None]) -> list[str]:
    """On a graceful stop: give the jobs this process is training back to the queue (``requeue``
    enqueues a job id again), unless one is already storing its result. Their training threads
    lose ownership, so nothing they do afterwards is stored."""
    assert CONTEXT is not None
    given_back = []
    for job_id, progress in list(RUNNING.items()):
        if progress.state.get("phase") == "storing":
            continue
        if CONTEXT.jobs.requeue(job_id, progress.worker):
            progress.lost = True
            requeue(job_id)
            given_back.append(job_id)
    return given_back


def _train_and_store(ctx: TrainerContext, record: dict, progress: _Progress) -> dict:
    job_id, profile_id, options = record["id"], record["profile_id"], record["options"]
    raw = ctx.jobs.data(job_id)
    if raw is None:
        raise XPeftError("job_data_missing", "the job's examples are gone (expired)")
    config = TrainConfig(**{k: options[k] for k in CONFIG_FIELDS})
    check_trainable(
        config, ctx.bank.num_adapters, ctx.bank.bottleneck
    )  # what the route checked, against this bank
    examples = decode_examples(raw)
    check_dataset(examples, ctx.settings.max_text_chars, ctx.settings.max_label_chars)
    train, held_out = split(examples, options["eval_fraction"], config.seed)
    model = ctx.get_model()
    progress.phase("training")
    result = train_profile(model.encoder, ctx.bank, train, config, progress=False, on_step=progress.on_step)
    result.profile.meta["model_name"] = ctx.settings.model or ctx.bank.model_name
    out: dict = {"stored": True, "seconds": round(result.seconds, 2), "examples": len(train)}
    if result.notes:  # what a user should know: no rule fitted, or one too small to calibrate
        out["notes"] = result.notes
    if held_out is not None:
        progress.phase("evaluating")
        out["eval_examples"] = len(held_out)
        out["eval_accuracy"] = evaluate(model, result.profile, held_out)["accuracy"]
    condition = None
    if options["keep_if_better"] and held_out is not None:
        current = _current(ctx, profile_id)
        condition = Condition(exists=False)
        if current is not None:
            condition = Condition(versions=frozenset({current[0]}))
            version, profile = current
            try:  # a profile of other labels (or another bank) cannot score these examples at all
                previous = evaluate(model, profile, held_out)["accuracy"] if profile else 0.0
            except XPeftError:
                previous = 0.0
            out.update(previous_version=version, previous_accuracy=previous)
            if out["eval_accuracy"] < previous:
                out.update(stored=False, version=version, reason="kept_current")
                return {"result": out}
    progress.phase("storing")
    if progress.publish() is None or progress.cancel:
        raise Cancelled()
    data = xpm.encode(result.profile)
    out["version"], out["unchanged"] = asyncio.run(
        _store(ctx.settings, ctx.bank, profile_id, data, condition)
    )
    return {"result": out}


def _current(ctx: TrainerContext, profile_id: str) -> tuple[int, Profile | None] | None:
    """The stored version and its profile (``None`` when it cannot be decoded against this bank)."""
    from xpeft.server.stores import open_store

    async def read() -> tuple[int, Profile | None] | None:
        store = open_store(ctx.settings)
        try:
            stored = await store.get(profile_id)
        finally:
            await store.close()
        if stored is None:
            return None
        try:
            return stored.version, xpm.decode(stored.data, ctx.bank)
        except xpm.ProfileFormatError:
            return stored.version, None

    return asyncio.run(read())


async def _store(
    settings: Settings, bank: AdapterBank, profile_id: str, data: bytes, condition: Condition | None
) -> tuple[int, bool]:
    """Exactly what ``PUT`` does: validate against the served bank, then the store's atomic put
    (which publishes the change to every replica). ``condition``: keep-if-better replaces only the
    version it was compared with. The version, and whether the same bytes were stored already."""
    from xpeft.server.stores import open_store
    from xpeft.server.stores.base import PreconditionFailed
    from xpeft.server.uploads import validate_profile

    meta = validate_profile(data, bank, settings.max_labels)
    store = open_store(settings)
    try:
        result = await store.put(profile_id, data, meta, condition)
    except PreconditionFailed:
        raise XPeftError(
            "profile_changed",
            f"profile {profile_id!r} was written while the job compared against it; nothing was stored",
        ) from None
    finally:
        await store.close()
    return result.record.version, result.unchanged
