"""A trainer process: a Huey consumer running one job at a time, plus a reaper and a parent watch.

``xpeft worker`` runs this on any machine that has the bank; ``xpeft serve`` with the embedded
store starts one as its child (``--parent-pid``: it stops when the server is gone). The process
lowers its priority and limits torch's threads before loading anything, so a trainer beside a
server leaves the CPU to serving first.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from xpeft.server.settings import Settings

log = logging.getLogger("xpeft.worker")


def _reaper(settings: Settings, stop: threading.Event) -> None:
    from xpeft.server.jobs.trainer import CONTEXT

    every = max(0.5, settings.train_lease_s / 3)
    while not stop.wait(every):
        try:
            assert CONTEXT is not None
            failed = CONTEXT.jobs.reap(settings.train_lease_s)
            if failed:
                log.warning("%d job(s) failed: their worker stopped reporting (worker_lost)", failed)
        except Exception:
            log.warning("reaper: the job store did not answer", exc_info=True)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("the server (pid %d) is gone: stopping", parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def run_worker(settings: Settings, parent_pid: int | None = None) -> None:
    """Serve the queue until SIGTERM (stop now: the job in hand is queued again) or SIGINT
    (finish the running job first)."""
    if settings.train_nice:
        os.nice(settings.train_nice)
    import torch

    torch.set_num_threads(settings.train_threads)
    from xpeft.server.jobs import trainer
    from xpeft.server.jobs.queue import make_queue, open_job_store
    from xpeft.server.model import load_bank

    if settings.bank is None:
        from xpeft.adapters.errors import XPeftError

        raise XPeftError("bad_argument", "worker needs --bank (or XPEFT_BANK)")
    bank = load_bank(settings.bank)
    trainer.CONTEXT = trainer.TrainerContext(settings, open_job_store(settings), bank)
    huey, task = make_queue(settings)
    stop = threading.Event()
    threading.Thread(target=_reaper, args=(settings, stop), name="xpeft-reaper", daemon=True).start()
    if parent_pid is not None:
        threading.Thread(
            target=_watch_parent, args=(parent_pid, stop), name="xpeft-parent", daemon=True
        ).start()
    log.info(
        "trainer ready: bank %s, store %s, %d torch thread(s), nice %d",
        bank.bank_id,
        "redis" if settings.redis_url else f"sqlite {settings.sqlite_path}",
        settings.train_threads,
        settings.train_nice,
    )
    consumer = huey.create_consumer(
        workers=1, worker_type="thread", periodic=False, check_worker_health=False
    )
    try:
        consumer.run()
    finally:
        stop.set()
        # a stop (SIGTERM, SIGINT), not a crash: the job in hand goes back to the queue at once
        for job_id in trainer.requeue_running(task):
            log.warning("job %s: stopped mid-training; queued again for another trainer", job_id)
