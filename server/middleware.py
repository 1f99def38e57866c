"""Pure ASGI middleware: request metrics by route template, admission (how many requests at once,
and none while draining for shutdown), and request body limits in size and time.

Pure ASGI (not BaseHTTPMiddleware) so that streaming bodies are counted as they arrive and a
client cannot make the server buffer more than the limit, nor hold a request open by sending its
body slowly.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xpeft.server.errors import BodyTimeout, BodyTooLarge, error_response
from xpeft.server.metrics import Metrics

# Always admitted: probes and monitoring must answer when the server is saturated or draining.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class MetricsMiddleware:
    """Counts requests by route template (never the raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 ``too_large`` past the size limit (profile uploads, PUT, get their own, larger one), and
    408 ``request_timeout`` when the body has not arrived within ``body_timeout_s``."""

    def __init__(
        self, app: ASGIApp, max_profile_bytes: int, max_request_bytes: int, body_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.max_profile_bytes = max_profile_bytes
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_profile_bytes if scope.get("method") == "PUT" else self.max_request_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = error_response(
                        413,
                        "too_large",
                        f"the request body of {declared} bytes exceeds the limit of {limit} bytes",
                    )
                    await response(scope, receive, send)
                    return
        received = 0
        body_done = False
        deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


class Admission:
    """Requests in flight, their limit, and the draining flag that SIGTERM raises.

    All of it is touched from the event loop only, except :meth:`begin_drain`, which a signal
    handler may call: it only sets attributes.
    """

    def __init__(self, max_in_flight: int, metrics: Metrics | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0
        self.draining = False
        self._idle: asyncio.Event | None = None
        if metrics is not None:
            metrics.in_flight.set_function(lambda: self.in_flight)

    def begin_drain(self) -> None:
        self.draining = True

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admission_refused.labels(reason).inc()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; ``False`` when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            self._idle = self._idle or asyncio.Event()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()
            self._idle = None


class AdmissionMiddleware:
    """503 ``shutting_down`` while draining, 503 ``overloaded`` past ``max_in_flight``; counts the rest.

    The in-flight limit bounds what a flood can make the server hold (each request at most one
    body), wherever the requests wait: reading their body, in a store lookup, or in the batch queue.
    """

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        gate = self.admission
        if gate.draining:
            gate._refused("draining")
            # Connection: close sends the client (or the load balancer) to another replica.
            response = error_response(
                503,
                "shutting_down",
                "this replica is shutting down; retry on another",
                {"Retry-After": "1", "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        if gate.in_flight >= gate.max_in_flight:
            gate._refused("in_flight")
            response = error_response(
                503,
                "overloaded",
                f"{gate.in_flight} requests are in flight (limit {gate.max_in_flight}); retry later",
                {"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            gate._leave()
