"""Pure ASGI middleware: request ids, request metrics by route template, admission (how many
requests at once, and none while draining for shutdown), and request body limits in size and time.

Pure ASGI (not BaseHTTPMiddleware) so that streaming bodies are counted as they arrive and a
client cannot make the server buffer more than the limit, nor hold a request open by sending its
body slowly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xpeft.server.errors import REQUEST_ID_HEADER, BodyTimeout, BodyTooLarge, error_response, request_id_var
from xpeft.server.metrics import Metrics

# Always admitted: probes and monitoring must answer when the server is saturated or draining.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The scope key that holds the request's arrival time (time.perf_counter()), for timing headers.
START_KEY = "xpeft.start"
# An incoming X-Request-ID is kept when it is 1 to 128 of these characters; else one is generated.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@+=/-]{1,128}")
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.lower().encode()
NOSNIFF = (b"x-content-type-options", b"nosniff")
_T = TypeVar("_T")


class RequestIdMiddleware:
    """Every request gets an id: the caller's ``X-Request-ID`` when it is safe to log (bounded,
    plain characters), else a new one. It is echoed on every response, errors included, and held
    in a context variable that the log filter and the error bodies read. Every response also says
    ``X-Content-Type-Options: nosniff``.

    The variable is set, not reset, on purpose: each request runs in its own task, and the handler
    of unexpected errors (outside this middleware) and uvicorn's access log run after it returns.
    """

    def __init__(self, app: ASGIApp, on_id: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.on_id = on_id  # e.g. recording the id on the request's trace span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[START_KEY] = time.perf_counter()
        given = next((v for k, v in scope.get("headers", ()) if k == _REQUEST_ID_BYTES), None)
        request_id = given.decode() if given and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        request_id_var.set(request_id)
        if self.on_id is not None:
            self.on_id(request_id)
        header = (_REQUEST_ID_BYTES, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == _REQUEST_ID_BYTES for k, _ in headers):
                    headers.append(header)
                # bodies echo labels and ids that a client chose: never let a browser sniff HTML
                message = {**message, "headers": [*headers, NOSNIFF]}
            await send(message)

        await self.app(scope, receive, send_with_id)


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
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls wait for a disconnect: no deadline on those
                return await receive()
            try:
                message = await by_deadline(deadline, receive())
            except (TimeoutError, asyncio.TimeoutError):
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def by_deadline(when: float, work: Awaitable[_T]) -> _T:
    """``work``, cancelled at the loop's time ``when`` (``TimeoutError``): in the caller's own task
    where Python has ``asyncio.timeout_at`` (3.11), rather than in a new task per call as
    ``wait_for`` runs it. The body deadline here and the predict route's deadline both use it."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(when):
            return await work
    remaining = max(0.0, when - asyncio.get_running_loop().time())  # pragma: no cover - Python 3.10
    return await asyncio.wait_for(work, remaining)  # pragma: no cover


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


# -- what is logged and how long headers may take -------------------------------------------
# Query parameters whose values may be logged; any other value (a token pasted into the URL, say)
# is replaced by *** in the access log.
_LOGGED_QUERY = frozenset({"cursor", "limit"})


def redact_query(query: str) -> str:
    """``cursor`` and ``limit`` as they are; every other ``name=value`` piece as ``***``."""
    pieces = []
    for piece in query.split("&"):
        name = unquote(piece.partition("=")[0]).lower()
        pieces.append(piece if name in _LOGGED_QUERY else "***")
    return "&".join(pieces)


class _RedactQueryFilter(logging.Filter):
    """Rewrites uvicorn's access-log line (its third argument is the path with the query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            record.args = (*args[:2], f"{path}?{redact_query(query)}", *args[3:])
        return True


def redact_access_log() -> None:
    """Install the query redaction on ``uvicorn.access`` (once; uvicorn's log setup keeps filters)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactQueryFilter) for f in logger.filters):
        logger.addFilter(_RedactQueryFilter())


def header_deadline_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """Uvicorn's HTTP protocol with a deadline on request headers (uvicorn has none of its own).

    A connection must complete its request headers within ``timeout_s`` of opening, and again of
    each response: otherwise it is closed. Slow-header ("slowloris") connections then cannot pile
    up. A request whose headers are complete starts a new cycle, which is what the timer checks,
    so both uvicorn implementations (httptools and h11) work unchanged.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools not installed: the pure-Python h11 implementation
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HeaderDeadlineProtocol(Base):
        _header_timer: asyncio.TimerHandle | None = None
        _armed_cycle: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete  # no request is being answered
            if cycle is self._armed_cycle and idle and not self.transport.is_closing():
                self.transport.close()  # no complete request headers in time

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's own refusal of a malformed request, as the API's JSON error (its is text)."""
            body = json.dumps({"error": "bad_request", "message": msg}).encode()
            head = [b"HTTP/1.1 400 Bad Request"]
            head += [name + b": " + value for name, value in self.server_state.default_headers]
            head += [
                b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(),
                b"connection: close",
                b": ".join(NOSNIFF),
            ]
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            self.transport.close()

    return HeaderDeadlineProtocol
