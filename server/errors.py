"""JSON errors everywhere: ``{"error": code, "message": ...}`` with a stable code per refusal.

Every exception that can leave a route is mapped here, so a client never sees an HTML page or
a bare stack trace, and the codes in docs/API.md are the only ones it has to handle.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from xpeft.adapters.errors import XPeftError
from xpeft.profiles.format import ProfileFormatError

log = logging.getLogger("xpeft.server")

# The id of the request being handled (set by RequestIdMiddleware). It lives in the request's own
# task, so the error handlers that run outside the middleware (500s) and the access log see it too.
request_id_var: ContextVar[str | None] = ContextVar("xpeft_request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"


class ApiError(Exception):
    """An HTTP refusal with a stable code; ``extra`` fields are added to the JSON body."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: object
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.extra = extra


class StoreUnavailable(XPeftError):
    """The profile store did not answer (down, timed out, or refused the connection)."""

    def __init__(self, message: str) -> None:
        super().__init__("store_unavailable", message)


class CorruptRecord(XPeftError):
    """A stored record that cannot be read back (its metadata is not a JSON object, or holds a
    string that is not text, say). ``kind``: ``profile`` or ``job``; ``profile_id`` is its id."""

    def __init__(self, profile_id: str, message: str, kind: str = "profile") -> None:
        super().__init__("corrupt_record", message)
        self.profile_id = profile_id
        self.kind = kind


class PreconditionFailed(XPeftError):
    """A conditional write (``If-Match``, ``If-None-Match: *``) whose condition did not hold: nothing
    was written. ``current`` is the id's version now, ``None`` when it does not exist."""

    def __init__(self, profile_id: str, current: int | None, message: str) -> None:
        super().__init__("precondition_failed", message)
        self.profile_id = profile_id
        self.current = current


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past its limit; an HTTPException so FastAPI re-raises it as is."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


class BodyTimeout(StarletteHTTPException):
    """The request body did not arrive in time (a slow or stalled client)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408, f"the request body did not arrive within {timeout_s:g} s", headers={"Connection": "close"}
        )


def etag(version: int) -> str:
    """The strong entity tag of a profile's stored version (its bytes and metadata of one write)."""
    return f'"{version}"'


_HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"}

# Default codes for errors that Starlette raises itself (unknown route, wrong method, ...).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "overloaded",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: object
) -> JSONResponse:
    """The one shape of every error; it carries the request's id (body and header) when there is one."""
    # a message may quote a request's value: never let one that is not text break the answer
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    request_id = request_id_var.get()
    if request_id is not None:
        extra.setdefault("request_id", request_id)
        headers = {**(headers or {}), REQUEST_ID_HEADER: request_id}
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


def profile_format_error(exc: ProfileFormatError) -> ApiError:
    """``bank_mismatch`` is a conflict with this server's bank; every other defect is the file's."""
    if exc.code == "bank_mismatch":
        return ApiError(409, "bank_mismatch", exc.message)
    return ApiError(422, "invalid_profile", f"{exc.code}: {exc.message}", detail=exc.code)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods the OpenAPI schema documents for this path
    (Starlette alone names only those of the first route that matched; FastAPI has one per method)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)), request.url.path):
            methods |= {m.upper() for m in operations if m.upper() in _HTTP_METHODS}
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Register the JSON handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(ProfileFormatError)
    async def _format_error(_: Request, exc: ProfileFormatError) -> JSONResponse:
        err = profile_format_error(exc)
        return error_response(err.status, err.code, err.message, None, **err.extra)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        # The detail names the store's address and the driver's error: for the log, not the caller.
        log.warning("store unavailable on %s %s: %s", request.method, request.url.path, exc.message)
        return error_response(
            503, exc.code, "the profile store did not answer; retry later", {"Retry-After": "1"}
        )

    @app.exception_handler(PreconditionFailed)
    async def _precondition(_: Request, exc: PreconditionFailed) -> JSONResponse:
        headers = {} if exc.current is None else {"ETag": etag(exc.current)}
        return error_response(412, exc.code, exc.message, headers, current_version=exc.current)

    @app.exception_handler(CorruptRecord)
    async def _corrupt(request: Request, exc: CorruptRecord) -> JSONResponse:
        # the store holds a record this version cannot show: a conflict with its state, which the
        # operator resolves with a DELETE (listings leave such records out)
        log.error("%s %r: %s", exc.kind, exc.profile_id, exc.message)
        if exc.kind == "job":
            fix = f"delete it with DELETE /jobs/{exc.profile_id}?purge=true"
        else:
            fix = "delete it (DELETE /profiles/{id}) and upload the profile again"
        return error_response(
            409, exc.code, f"the stored record of {exc.kind} {exc.profile_id!r} is damaged; {fix}"
        )

    @app.exception_handler(XPeftError)
    async def _xpeft_error(_: Request, exc: XPeftError) -> JSONResponse:
        return error_response(422, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = _validation_message(exc)
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            message += " (send the body as JSON with Content-Type: application/json)"
        return error_response(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, headers = exc.status_code, getattr(exc, "headers", None)
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 400:  # a body that cannot be parsed (not UTF-8, say): the same refusal as bad JSON
            status, message = 422, f"{message} (send the body as JSON with Content-Type: application/json)"
        if status == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return error_response(status, _STATUS_CODES.get(status, "http_error"), message, headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # the client closed the connection before its body arrived: nothing failed here, so no
        # traceback and no 5xx; 499 (nginx's "client closed request") is what the metrics count
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return error_response(499, "client_closed_request", "the client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: the server failed; see its log")
