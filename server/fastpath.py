"""The predict route's own dispatch, in front of FastAPI's router.

Predicts are nearly all of a server's requests, and FastAPI's route matching, dependency solving
and exception wrappers cost about as much event-loop time per request as everything else the
server does for one (``bench.load.single`` reports the loop's CPU per request). So
``POST /profiles/{id}/predict`` is matched here, by its two fixed parts, and handed straight to
the same handler that FastAPI documents (:func:`xpeft.server.routes.predict`). It sits inside
every middleware of the app (request ids, metrics, admission, body limits), which see it as they
see any request; its errors go through the app's own exception handlers, so they read exactly as
they would through the router.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from xpeft.server.routes import router

__all__ = ["PREDICT_PATH", "PredictFastPath"]

PREDICT_PATH = "/profiles/{profile_id}/predict"
_PREFIX, _SUFFIX = "/profiles/", "/predict"
Endpoint = Callable[[Request, str], Awaitable[Response]]


class PredictFastPath:
    """``POST /profiles/<id>/predict`` to its handler; every other request to ``app``.

    An id with a ``/`` is not a predict (the router refuses it with its own message), nor is an
    empty one. The request carries the route, as the router would set it, so that the metrics
    count it under its template.
    """

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        route = next(
            r
            for r in router.routes
            if isinstance(r, APIRoute) and r.path == PREDICT_PATH and "POST" in (r.methods or ())
        )
        self.route = route
        self.endpoint: Endpoint = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith(_SUFFIX):
            await self.app(scope, receive, send)
            return
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        profile_id = path[len(_PREFIX) : -len(_SUFFIX)]
        if not path.startswith(_PREFIX) or not profile_id or "/" in profile_id:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        scope["endpoint"] = self.endpoint
        scope["path_params"] = {"profile_id": profile_id}
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request, profile_id)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The response of the app's handler for ``exc`` (by its class's MRO, as Starlette looks
        one up); an error no handler names but ``Exception``'s goes on up, to the server-error
        handler, as it would from the router."""
        handlers = self.fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                break
            handler = handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)  # the app's handlers are all async
                return await response if inspect.isawaitable(response) else response
        raise exc
