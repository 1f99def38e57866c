"""What :class:`~xpeft.client.Client` and :class:`~xpeft.client.AsyncClient` share.

Each operation (a generator here) builds its requests and reads the answers without doing I/O;
a client class only sends what it yields, in turn or concurrently. So request building, the
splitting of long input lists, response parsing, tokens and the retry policy are written once.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from xpeft.adapters.errors import XPeftError
from xpeft.server.wire import DEFAULT_MAX_INPUTS, PROFILE_ID_PATTERN

_PROFILE_ID = re.compile(PROFILE_ID_PATTERN)

__all__ = [
    "DEFAULT_MAX_INPUTS",
    "RETRY_STATUSES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "Call",
    "ClientBase",
    "ClientError",
    "Deadline",
    "Op",
    "R",
    "TextInput",
    "connection_error",
    "answer_of",
    "capped",
    "list_call",
    "next_page",
    "predict_op",
    "profile_path",
    "read_response",
    "retry_after_seconds",
    "single",
    "upload_call",
]
TextInput = str | tuple[str, str] | list[str]

# DEFAULT_MAX_INPUTS: the server's default; a server with a smaller XPEFT_MAX_INPUTS needs max_inputs=
RETRY_STATUSES = frozenset({429, 503})  # the server did no work: the same request may succeed later
_NOT_RETRIED = frozenset({"model_failed"})  # a 503 that only a restart cures
_VERSION_ROUNDS = 3  # re-sends of the chunks a newer version overtook, before `version_changed`
_WRITE_TOKENS = ("XPEFT_ADMIN_TOKEN", "XPEFT_TOKEN")
_READ_TOKENS = ("XPEFT_API_TOKEN", "XPEFT_ADMIN_TOKEN", "XPEFT_TOKEN")


class ClientError(XPeftError):
    """A refusal from the server (``status`` is the HTTP status; 0 when it could not be reached).

    ``retryable`` says whether the same request may succeed later (the client already retried it
    as often as it was allowed); ``retry_after`` is the server's ``Retry-After`` in seconds.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 0,
        body: dict | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.body = body or {}
        self.retryable = retryable
        self.retry_after = retry_after


def profile_path(profile_id: str, suffix: str = "") -> str:
    """``/profiles/<id><suffix>``, for valid ids only.

    An id such as ``mine/../victim`` would otherwise be normalised by the HTTP library into
    ``/profiles/victim``: it is refused here, before any request, and valid ids are quoted anyway.
    """
    if not isinstance(profile_id, str) or not _PROFILE_ID.fullmatch(profile_id):
        raise ClientError(
            "invalid_profile_id",
            f"profile ids match {PROFILE_ID_PATTERN} (letters, digits, '.', '_', '-'); got {profile_id!r:.200}",
        )
    return f"/profiles/{quote(profile_id, safe='')}{suffix}"


# -- operations: requests out, answers in, no I/O ---------------------------------------------
@dataclass(frozen=True)
class Call:
    """One HTTP request; ``raw`` answers with the body's bytes instead of its JSON."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    raw: bool = False

    @property
    def is_write(self) -> bool:
        """Writes send the admin token (a predict is a POST that only reads)."""
        return self.method in {"PUT", "POST", "PATCH", "DELETE"} and not self.path.endswith("/predict")


R = TypeVar("R")
# an operation yields the requests to send together and receives their answers, in order
Op = Generator[list[Call], list[Any], R]


def single(call: Call) -> Op[Any]:
    """The operation of one request: its answer."""
    (answer,) = yield [call]
    return answer


def predict_op(
    profile_id: str, inputs: Sequence[TextInput], max_inputs: int, min_confidence: float | None = None
) -> Op[dict]:
    """Predict, in chunks of ``max_inputs`` when there are more; answers are re-joined in order.
    ``min_confidence``: this request's operating point for the profile's abstention rule.

    The answer comes from one version of the profile, as one request's would: chunks that an
    upload overtook are sent again (``_VERSION_ROUNDS`` times, then ``version_changed``).
    """
    path = profile_path(profile_id, "/predict")
    items = [x if isinstance(x, str) else list(x) for x in inputs]
    point = {} if min_confidence is None else {"min_confidence": min_confidence}
    if len(items) <= max_inputs:  # one request; the server refuses an empty list itself
        return (yield from single(Call("POST", path, {"json": {"inputs": items, **point}})))
    chunks = [items[i : i + max_inputs] for i in range(0, len(items), max_inputs)]
    answers = yield [Call("POST", path, {"json": {"inputs": c, **point}}) for c in chunks]
    for _ in range(_VERSION_ROUNDS):
        newest = max(a["version"] for a in answers)
        stale = [i for i, a in enumerate(answers) if a["version"] != newest]
        if not stale:
            predictions = [p for a in answers for p in a["predictions"]]
            return {"profile": answers[0]["profile"], "version": newest, "predictions": predictions}
        fresh = yield [Call("POST", path, {"json": {"inputs": chunks[i], **point}}) for i in stale]
        for i, answer in zip(stale, fresh, strict=True):
            answers[i] = answer
    raise ClientError(
        "version_changed",
        f"profile {profile_id!r} was replaced {_VERSION_ROUNDS} times while its {len(items)} inputs "
        f"were predicted in chunks of {max_inputs}; retry",
    )


def upload_call(profile_id: str, profile: bytes | str | Path) -> Call:
    data = profile if isinstance(profile, bytes) else Path(profile).read_bytes()
    return Call(
        "PUT",
        profile_path(profile_id),
        {"content": data, "headers": {"Content-Type": "application/octet-stream"}},
    )


def list_call(cursor: str | None, limit: int) -> Call:
    params: dict[str, Any] = {"limit": limit}
    if cursor:
        params["cursor"] = cursor
    return Call("GET", "/profiles", {"params": params})


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds from now; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def read_response(call: Call, response: httpx.Response) -> Any:
    """The answer's JSON (or bytes), else a :class:`ClientError` with the server's code; an answer
    that is not the JSON it should be (an HTML page from a proxy, say) is ``bad_response``."""
    if response.is_success:
        if call.raw:
            return response.content
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise ClientError(
                "bad_response",
                f"{call.method} {call.path}: the server answered {response.status_code} with {kind:.60}, "
                f"not JSON: {response.text[:80]!r}",
                response.status_code,
            ) from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    code = body.get("error") or f"http_{response.status_code}"
    raise ClientError(
        code,
        body.get("message") or response.text[:200],
        response.status_code,
        body,
        retryable=response.status_code in RETRY_STATUSES and code not in _NOT_RETRIED,
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
    )


def connection_error(call: Call, base_url: object, exc: httpx.HTTPError) -> ClientError:
    """No answer. Retryable when nothing reached the server, or when the request may safely run twice."""
    unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    dropped = isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError) and call.method != "DELETE"
    return ClientError(
        "connection_error", f"{call.method} {base_url}{call.path}: {exc}", retryable=unsent or dropped
    )


#: the largest answer a client reads (a profile file is at most a few MiB; a page of jobs 1 MiB)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 2**20


class Deadline:
    """One request's whole time: a server that trickles its answer a byte at a time still ends
    the call at ``timeout`` s (httpx's own timeout bounds each read, not their sum)."""

    def __init__(self, timeout: float, call: Call) -> None:
        self.timeout = timeout
        self.call = call
        self.ends = time.monotonic() + timeout

    def passed(self) -> ClientError:
        return ClientError(
            "timeout", f"{self.call.method} {self.call.path}: no complete answer within {self.timeout:g} s"
        )

    def left(self) -> float:
        """Seconds left; :class:`ClientError` ``timeout`` once there are none."""
        left = self.ends - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left


def capped(chunks: list[bytes], chunk: bytes, limit: int, call: Call) -> None:
    """Add ``chunk`` to an answer being read, refusing it past ``limit`` bytes (``response_too_large``)."""
    chunks.append(chunk)
    if sum(map(len, chunks)) > limit:
        raise ClientError(
            "response_too_large",
            f"{call.method} {call.path}: the answer exceeds {limit} bytes; not read further",
        )


def answer_of(response: httpx.Response, body: bytes) -> httpx.Response:
    """A streamed response, read in full, as one :func:`read_response` reads."""
    return httpx.Response(
        response.status_code, headers=response.headers, content=body, request=response.request
    )


def next_page(cursor: str | None, page: dict, key: str, seen: set[str]) -> str | None:
    """A page's ``next_cursor``, checked: a cursor that does not move on (one seen before) would
    page forever; it ends the listing with ``bad_response``."""
    if not isinstance(page, dict) or not isinstance(page.get(key), list):
        raise ClientError("bad_response", f"a page without its {key!r} list")
    following = page.get("next_cursor")
    if following is None or following == "":
        return None
    if not isinstance(following, str) or following == cursor or following in seen:
        raise ClientError("bad_response", f"the server's next_cursor {following!r:.80} does not advance")
    seen.add(following)
    return following


class ClientBase:
    """What both clients share: tokens, limits and the retry policy."""

    def __init__(
        self,
        token: str | None,
        max_inputs: int,
        max_attempts: int,
        max_retry_seconds: float,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if max_inputs < 1 or max_attempts < 1 or max_retry_seconds < 0 or max_response_bytes < 1:
            raise ValueError(
                "max_inputs, max_attempts and max_response_bytes must be >= 1, max_retry_seconds >= 0"
            )
        self.max_inputs = max_inputs
        self.max_attempts = max_attempts
        self.max_retry_seconds = max_retry_seconds
        self.max_response_bytes = max_response_bytes
        write = token if token is not None else _env_token(_WRITE_TOKENS)
        read = token if token is not None else _env_token(_READ_TOKENS)
        self._auth = {True: _bearer(write), False: _bearer(read)}

    def _headers(self, call: Call) -> dict[str, str]:
        return {**self._auth[call.is_write], **call.kwargs.get("headers", {})}

    def _retry_policy(self) -> dict[str, Any]:
        """tenacity arguments: retryable refusals only, at most ``max_attempts`` sends, and no wait
        that would end past ``max_retry_seconds`` from the first send."""
        return {
            "retry": retry_if_exception(lambda e: isinstance(e, ClientError) and e.retryable),
            "stop": stop_after_attempt(self.max_attempts) | stop_before_delay(self.max_retry_seconds),
            "wait": _wait,
            "reraise": True,
        }


_backoff = wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.2)


def _wait(state: RetryCallState) -> float:
    """The server's ``Retry-After`` when it sent one, else exponential backoff with jitter."""
    exc = state.outcome.exception() if state.outcome is not None else None
    after = exc.retry_after if isinstance(exc, ClientError) else None
    return after if after is not None else _backoff(state)


def _env_token(names: Sequence[str]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
