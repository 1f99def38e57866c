"""``xpeft serve`` and ``xpeft upload``: registered on the main ``xpeft`` parser by profiles/cli.py.

Flags override ``XPEFT_*`` environment variables; tokens are taken from the environment only,
so they never show in a process listing.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from xpeft.adapters.errors import XPeftError

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


def build_settings(args: argparse.Namespace) -> Any:
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


# After the drain, uvicorn itself waits this long for responses being written, then closes.
FINAL_GRACE_S = 5.0


def graceful_server(app: Any, settings: Any) -> Any:
    """A ``uvicorn.Server`` whose first SIGTERM (or SIGINT) drains before it stops.

    Uvicorn alone closes its port at once on SIGTERM, so requests that arrive while in-flight ones
    finish are refused by the kernel, not answered. Here the first signal only raises the draining
    flag: the port stays open, new requests get 503 ``shutting_down`` and ``/readyz`` turns 503,
    in-flight ones finish (at most ``XPEFT_DRAIN_TIMEOUT_S``), then uvicorn's own shutdown runs.
    A second signal stops at once. The process exits within about
    ``drain_delay_s + drain_timeout_s + FINAL_GRACE_S`` seconds of the first.
    """
    import asyncio

    import uvicorn

    state = app.state.server

    class GracefulServer(uvicorn.Server):
        draining = False
        drain_task: asyncio.Task | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.draining or self.should_exit:
                super().handle_exit(sig, frame)  # a second signal: stop now
                return
            self.draining = True  # attributes only: this runs in a signal handler
            state.admission.begin_drain()

        async def on_tick(self, counter: int) -> bool:
            if self.draining and self.drain_task is None:
                self.drain_task = asyncio.create_task(state.drain(), name="xpeft-drain")
            if self.drain_task is not None and self.drain_task.done():
                self.should_exit = True
            return await super().on_tick(counter)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=FINAL_GRACE_S,
    )
    return GracefulServer(config)


def cmd_serve(args: argparse.Namespace) -> None:
    from xpeft.server.app import create_app

    settings = build_settings(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    log = logging.getLogger("xpeft.server")
    if settings.admin_token is None:
        log.warning(
            "XPEFT_ADMIN_TOKEN is not set: anyone who reaches this server may upload and delete profiles"
        )
    tenants = app.state.server.auth.tenants
    if tenants:
        log.info("%d predict tokens, each limited to its profile-id prefixes", tenants)
    graceful_server(app, settings).run()


def cmd_upload(args: argparse.Namespace) -> None:
    from xpeft.server.client import upload_cli

    upload_cli(args)


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``upload`` to the ``xpeft`` command."""
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

    p = subparsers.add_parser("upload", help="upload a profile file to a server")
    p.add_argument("file", help="the .xpm file")
    p.add_argument("--id", dest="profile_id", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--token", default=None, help="admin token (default: $XPEFT_TOKEN)")
    p.set_defaults(func=cmd_upload)
