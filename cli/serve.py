"""``xpeft serve``: flags on top of ``XPEFT_*`` environment variables, then the server process.

Tokens are taken from the environment only, so they never show in a process listing. Running
the process (uvicorn, the SIGTERM drain) is :func:`xpeft.server.runner.run_server`'s job.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from xpeft.adapters.errors import XPeftError

if TYPE_CHECKING:
    from xpeft.server.settings import Settings

# flag dest -> Settings field, for the flags that override settings
_SERVE_FLAGS = (
    "bank",
    "model",
    "host",
    "port",
    "redis_url",
    "sqlite_path",
    "device",
    "dtype",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "fused_cache_bytes",
    "log_level",
)


def build_settings(args: argparse.Namespace) -> Settings:
    """Environment first, flags on top; a bad value is a clear ``bad_argument`` error."""
    from pydantic import ValidationError

    from xpeft.server.settings import Settings

    overrides = {name: getattr(args, name) for name in _SERVE_FLAGS if getattr(args, name, None) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise XPeftError("bad_argument", problems) from exc
    if settings.bank is None:
        raise XPeftError("bad_argument", "serve needs --bank (or XPEFT_BANK)")
    return settings


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C; bad settings fail before the port opens."""
    from xpeft.server.runner import run_server

    run_server(build_settings(args))


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``xpeft`` command."""
    p = subparsers.add_parser("serve", help="run the HTTP server (settings: flags, then XPEFT_* variables)")
    p.add_argument("--bank", help="bank file (XPEFT_BANK)")
    p.add_argument("--model", help="encoder; default: the bank's model_name, else minilm (XPEFT_MODEL)")
    p.add_argument("--host", help="default 127.0.0.1 (XPEFT_HOST)")
    p.add_argument("--port", type=int, help="default 8000 (XPEFT_PORT)")
    p.add_argument(
        "--redis-url", help="shared Redis store; without it an embedded SQLite file (XPEFT_REDIS_URL)"
    )
    p.add_argument("--sqlite-path", help="the embedded store's file (XPEFT_SQLITE_PATH)")
    p.add_argument("--device", help="cuda, cpu, cuda:1, ... (XPEFT_DEVICE)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="(XPEFT_DTYPE)")
    p.add_argument("--max-batch-size", type=int, help="rows per forward (XPEFT_MAX_BATCH_SIZE)")
    p.add_argument("--max-wait-ms", type=float, help="batch fill wait (XPEFT_MAX_WAIT_MS)")
    p.add_argument("--max-queue", type=int, help="queued requests before 503 (XPEFT_MAX_QUEUE)")
    p.add_argument(
        "--fused-cache-bytes", type=int, help="device cache of fused weights (XPEFT_FUSED_CACHE_BYTES)"
    )
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
