"""What one app instance owns, in one object (``app.state.server``).

Its own module so that the routes, the request dependencies and the app factory all import it
from here, and none of them imports another to reach it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from xpeft.adapters.bank import AdapterBank
from xpeft.engine.batcher import MicroBatcher
from xpeft.engine.worker import ModelWorker
from xpeft.server.auth import Authorizer
from xpeft.server.cache import ProfileCache
from xpeft.server.errors import ApiError
from xpeft.server.metrics import Metrics
from xpeft.server.middleware import Admission
from xpeft.server.settings import Settings
from xpeft.server.stores import ProfileStore
from xpeft.server.sync import CacheSync

log = logging.getLogger("xpeft.server")
__all__ = ["ServerState"]


@dataclass
class ServerState:
    """Everything one app instance owns (``app.state.server``)."""

    settings: Settings
    metrics: Metrics
    store: ProfileStore
    bank: AdapterBank
    profiles: ProfileCache
    worker: ModelWorker
    batcher: MicroBatcher
    sync: CacheSync
    auth: Authorizer
    admission: Admission
    model_error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def model_ready(self) -> bool:
        return self.worker.model is not None

    async def drain(self) -> int:
        """After SIGTERM: refuse new requests, wait for those in flight, then answer any still queued.

        Waits at least ``drain_delay_s`` (load balancers see /readyz turn 503 and stop sending) and
        at most ``drain_delay_s + drain_timeout_s``. Returns how many requests were still in flight.
        """
        settings = self.settings
        self.admission.begin_drain()
        log.warning(
            "shutting down: refusing new requests, draining %d in flight (at most %g s)",
            self.admission.in_flight,
            settings.drain_delay_s + settings.drain_timeout_s,
        )
        await asyncio.sleep(settings.drain_delay_s)
        if await self.admission.wait_idle(settings.drain_timeout_s):
            return 0
        left = self.admission.in_flight
        log.warning(
            "drain timeout: %d requests still in flight; queued predictions get 503 shutting_down", left
        )
        self.batcher.fail_pending(ApiError(503, "shutting_down", "the server is shutting down"))
        return left
