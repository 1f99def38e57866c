"""Running the app as a process: uvicorn with a drain on SIGTERM, logging and startup warnings.

``xpeft serve`` turns its flags into :class:`~xpeft.server.settings.Settings` and calls
:func:`run_server`; anything else that wants the same process behaviour (a container entry point,
a test harness) can call it too.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI

from xpeft.server.settings import Settings

# After the drain, uvicorn itself waits this long for responses being written, then closes.
FINAL_GRACE_S = 5


def graceful_server(app: FastAPI, settings: Settings) -> Any:
    """A ``uvicorn.Server`` whose first SIGTERM (or SIGINT) drains before it stops.

    Uvicorn alone closes its port at once on SIGTERM, so requests that arrive while in-flight ones
    finish are refused by the kernel, not answered. Here the first signal only raises the draining
    flag: the port stays open, new requests get 503 ``shutting_down`` and ``/readyz`` turns 503,
    in-flight ones finish (at most ``XPEFT_DRAIN_TIMEOUT_S``), then uvicorn's own shutdown runs.
    A second signal stops at once. The process exits within about
    ``drain_delay_s + drain_timeout_s + FINAL_GRACE_S`` seconds of the first.
    """
    import uvicorn

    from xpeft.server.middleware import header_deadline_protocol

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
        log_config=None,  # keep configure_logging's one format (text or JSON) for uvicorn's lines too
        timeout_graceful_shutdown=FINAL_GRACE_S,
        http=header_deadline_protocol(settings.header_timeout_s),
    )
    return GracefulServer(config)


def run_server(settings: Settings) -> None:
    """Build the app from ``settings`` and serve until a signal; refuses bad settings before listening."""
    from xpeft.server.app import create_app
    from xpeft.server.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    log = logging.getLogger("xpeft.server")  # create_app announced open writes (protected mode)
    tenants = app.state.server.auth.tenants
    if tenants:
        log.info("%d predict tokens, each limited to its profile-id prefixes", tenants)
    graceful_server(app, settings).run()
