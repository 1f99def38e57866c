"""Pure ASGI middleware: request metrics by route template, and request body limits.

Pure ASGI (not BaseHTTPMiddleware) so that streaming bodies are counted as they arrive and a
client cannot make the server buffer more than the limit.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xpeft.server.errors import BodyTooLarge, error_response
from xpeft.server.metrics import Metrics


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
    """413 ``too_large`` past the limit: profile uploads (PUT) get their own, larger limit."""

    def __init__(self, app: ASGIApp, max_profile_bytes: int, max_request_bytes: int) -> None:
        self.app = app
        self.max_profile_bytes = max_profile_bytes
        self.max_request_bytes = max_request_bytes

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
                    response = error_response(413, "too_large", f"the request body of {declared} bytes exceeds "
                                                                f"the limit of {limit} bytes")
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)
