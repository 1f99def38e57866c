"""``xpeft worker``: a trainer process for training as a service (server/jobs/worker.py).

Run it on any machine that has the bank and reaches the store: ``--redis-url`` for the shared
Redis (as many workers as you like), or ``--sqlite-path`` for the embedded store (``xpeft
serve`` starts one itself). Settings come from ``XPEFT_*`` variables with these flags on top.
"""

from __future__ import annotations

import argparse
from typing import Any

from xpeft.adapters.errors import XPeftError

_FLAGS = ("bank", "model", "redis_url", "sqlite_path", "device", "train_threads", "train_nice", "log_level")


def cmd_worker(args: argparse.Namespace) -> None:
    import logging

    from pydantic import ValidationError

    from xpeft.server.jobs.worker import run_worker
    from xpeft.server.settings import Settings

    overrides = {n: getattr(args, n) for n in _FLAGS if getattr(args, n, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise XPeftError("bad_argument", problems) from exc
    from xpeft.server.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)  # XPEFT_LOG_FORMAT, as the server's
    logging.getLogger("huey").setLevel(max(logging.WARNING, logging.getLogger().level))
    run_worker(settings, parent_pid=args.parent_pid)


def register(subparsers: Any) -> None:
    """Add ``worker`` to the ``xpeft`` command."""
    p = subparsers.add_parser("worker", help="run a trainer for POST /profiles/{id}/train jobs")
    p.add_argument("--bank", help="the served bank file (XPEFT_BANK)")
    p.add_argument("--model", help="encoder; default: the bank's own (XPEFT_MODEL)")
    p.add_argument("--redis-url", help="the shared Redis store (XPEFT_REDIS_URL)")
    p.add_argument("--sqlite-path", help="the embedded store's file (XPEFT_SQLITE_PATH)")
    p.add_argument("--device", help="torch device (XPEFT_DEVICE)")
    p.add_argument(
        "--threads", dest="train_threads", type=int, help="torch CPU threads (XPEFT_TRAIN_THREADS, default 1)"
    )
    p.add_argument("--nice", dest="train_nice", type=int, help="niceness 0-19 (XPEFT_TRAIN_NICE, default 10)")
    p.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (XPEFT_LOG_LEVEL, default info)",
    )
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_worker)
