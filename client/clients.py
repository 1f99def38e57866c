"""Python clients for the xpeft server (httpx): :class:`Client` and :class:`AsyncClient`.

Every refusal raises :class:`ClientError` with the server's stable ``code``, so callers (and the
CLI, which prints ``error: <code>: <message>``) never parse HTML or guess from status codes.
Both classes have the same methods and run the same operations (:mod:`xpeft.client.core`).

Tokens: an explicit ``token`` is sent with every request. Without one, the client reads the
variables the server reads: writes send ``$XPEFT_ADMIN_TOKEN``; reads and predictions send
``$XPEFT_API_TOKEN``, else ``$XPEFT_ADMIN_TOKEN``; ``$XPEFT_TOKEN`` is the fallback for both (a
tenant's predict token, say).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, Retrying

from xpeft.client.core import (
    DEFAULT_MAX_INPUTS,
    DEFAULT_MAX_RESPONSE_BYTES,
    Call,
    ClientBase,
    ClientError,
    Deadline,
    Op,
    R,
    TextInput,
    answer_of,
    capped,
    connection_error,
    list_call,
    next_page,
    predict_op,
    profile_path,
    read_response,
    upload_call,
)
from xpeft.client.training import TrainJob, job_path, train_call

__all__ = ["DEFAULT_MAX_INPUTS", "AsyncClient", "Client", "ClientError", "TextInput", "profile_path"]


class Client(ClientBase):
    """Talks to one server (or load balancer). Use as a context manager to close connections.

    ``token`` is sent as ``Authorization: Bearer`` (without it: the module's token variables).
    Predictions of more than ``max_inputs`` inputs are split into several requests. Refusals the
    server may lift (429, 503 and unreached servers) are retried, after its ``Retry-After``, at
    most ``max_attempts`` sends and ``max_retry_seconds`` of waiting.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_inputs: int = DEFAULT_MAX_INPUTS,
        max_attempts: int = 4,
        max_retry_seconds: float = 30.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(token, max_inputs, max_attempts, max_retry_seconds, max_response_bytes)
        self.timeout = timeout
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _once(self, call: Call) -> Any:
        """One send: the answer read in full, within ``timeout`` s in all and ``max_response_bytes``."""
        kwargs = {**call.kwargs, "headers": self._headers(call)}
        deadline = Deadline(self.timeout, call)
        chunks: list[bytes] = []
        try:
            with self._http.stream(call.method, call.path, **kwargs) as response:
                for chunk in response.iter_bytes():
                    capped(chunks, chunk, self.max_response_bytes, call)
                    deadline.left()
        except httpx.HTTPError as exc:
            raise connection_error(call, self._http.base_url, exc) from exc
        return read_response(call, answer_of(response, b"".join(chunks)))

    def _send(self, call: Call) -> Any:
        return Retrying(**self._retry_policy())(self._once, call)

    def _run(self, op: Op[R]) -> R:
        """Send what the operation yields, one request after another."""
        try:
            calls = next(op)
            while True:
                calls = op.send([self._send(c) for c in calls])
        except StopIteration as done:
            return done.value

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request (with retries) and its JSON answer."""
        return self._send(Call(method, path, kwargs))

    # -- profiles --------------------------------------------------------------------------
    def upload(self, profile_id: str, profile: bytes | str | Path) -> dict:
        """PUT a profile file (bytes or a path); returns its metadata with ``version``."""
        return self._send(upload_call(profile_id, profile))

    def get(self, profile_id: str) -> dict:
        return self._send(Call("GET", profile_path(profile_id)))

    def download(self, profile_id: str) -> bytes:
        """The stored ``.xpm`` bytes, exactly as uploaded (backup, or moving to another deployment)."""
        return self._send(Call("GET", profile_path(profile_id, "/file"), raw=True))

    def delete(self, profile_id: str) -> dict:
        return self._send(Call("DELETE", profile_path(profile_id)))

    def list(self, cursor: str | None = None, limit: int = 100) -> dict:
        """One page: ``{"profiles": [...], "next_cursor"}``."""
        return self._send(list_call(cursor, limit))

    def iter_profiles(self, page_size: int = 100) -> Iterator[dict]:
        """Every profile's metadata, following the cursor page by page."""
        cursor, seen = None, set[str]()
        while True:
            page = self.list(cursor, page_size)
            following = next_page(cursor, page, "profiles", seen)
            yield from page["profiles"]
            if following is None:
                return
            cursor = following

    def predict(
        self, profile_id: str, inputs: Sequence[TextInput], min_confidence: float | None = None
    ) -> dict:
        """``{"profile", "version", "predictions": [{"label", "score", "scores", "abstained"}, ...]}``;
        ``label`` is None (or the fallback label) where the profile's rule abstained, under
        ``min_confidence`` when given, else the profile's own operating point."""
        return self._run(predict_op(profile_id, inputs, self.max_inputs, min_confidence))

    # -- operations ------------------------------------------------------------------------
    def health(self) -> dict:
        return self._send(Call("GET", "/healthz"))

    def ready(self) -> dict:
        return self._send(Call("GET", "/readyz"))

    # -- training (client/training.py) ----------------------------------------------------
    def train(
        self,
        profile_id: str,
        examples: Sequence[dict] | None = None,
        file: str | Path | None = None,
        columns: dict[str, str] | None = None,
        **options: Any,
    ) -> TrainJob:
        """Queue a training job (JSON ``examples``, or a labelled ``file`` with its ``columns``:
        text_col, text_pair_col, label_col); ``options``: method, epochs, eval_fraction,
        keep_if_better, ... Returns the job; ``job.wait()`` follows it to the end."""
        return TrainJob(self, self._send(train_call(profile_id, examples, file, columns, **options)))

    def job(self, job_id: str) -> dict:
        return self._send(Call("GET", job_path(job_id)))

    def cancel_job(self, job_id: str) -> dict:
        return self._send(Call("DELETE", job_path(job_id)))

    def jobs(self, cursor: str | None = None, limit: int = 100) -> dict:
        """One page of jobs, newest first: ``{"jobs": [...], "next_cursor"}``."""
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return self._send(Call("GET", "/jobs", {"params": params}))


class AsyncClient(ClientBase):
    """:class:`Client` for asyncio: the same methods, awaited; the chunks of a long prediction
    are sent concurrently (at most ``max_concurrency`` at once). Use ``async with``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_inputs: int = DEFAULT_MAX_INPUTS,
        max_attempts: int = 4,
        max_retry_seconds: float = 30.0,
        max_concurrency: int = 8,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(token, max_inputs, max_attempts, max_retry_seconds, max_response_bytes)
        self.timeout = timeout
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, transport=transport)
        self._slots = asyncio.Semaphore(max_concurrency)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _once(self, call: Call) -> Any:
        kwargs = {**call.kwargs, "headers": self._headers(call)}
        chunks: list[bytes] = []

        async def read() -> httpx.Response:
            async with self._http.stream(call.method, call.path, **kwargs) as response:
                async for chunk in response.aiter_bytes():
                    capped(chunks, chunk, self.max_response_bytes, call)
            return response

        deadline = Deadline(self.timeout, call)
        try:
            async with self._slots:  # the whole request, headers included, within the timeout
                deadline = Deadline(self.timeout, call)
                response = await asyncio.wait_for(read(), deadline.left())
        except httpx.HTTPError as exc:
            raise connection_error(call, self._http.base_url, exc) from exc
        except asyncio.TimeoutError:
            raise deadline.passed() from None
        return read_response(call, answer_of(response, b"".join(chunks)))

    async def _send(self, call: Call) -> Any:
        return await AsyncRetrying(**self._retry_policy())(self._once, call)

    async def _run(self, op: Op[R]) -> R:
        """Send what the operation yields, the requests of one step concurrently."""
        try:
            calls = next(op)
            while True:
                calls = op.send(list(await asyncio.gather(*(self._send(c) for c in calls))))
        except StopIteration as done:
            return done.value

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return await self._send(Call(method, path, kwargs))

    async def upload(self, profile_id: str, profile: bytes | str | Path) -> dict:
        return await self._send(upload_call(profile_id, profile))

    async def get(self, profile_id: str) -> dict:
        return await self._send(Call("GET", profile_path(profile_id)))

    async def download(self, profile_id: str) -> bytes:
        return await self._send(Call("GET", profile_path(profile_id, "/file"), raw=True))

    async def delete(self, profile_id: str) -> dict:
        return await self._send(Call("DELETE", profile_path(profile_id)))

    async def list(self, cursor: str | None = None, limit: int = 100) -> dict:
        return await self._send(list_call(cursor, limit))

    async def iter_profiles(self, page_size: int = 100) -> AsyncIterator[dict]:
        cursor, seen = None, set[str]()
        while True:
            page = await self.list(cursor, page_size)
            following = next_page(cursor, page, "profiles", seen)
            for meta in page["profiles"]:
                yield meta
            if following is None:
                return
            cursor = following

    async def predict(
        self, profile_id: str, inputs: Sequence[TextInput], min_confidence: float | None = None
    ) -> dict:
        return await self._run(predict_op(profile_id, inputs, self.max_inputs, min_confidence))

    async def health(self) -> dict:
        return await self._send(Call("GET", "/healthz"))

    async def ready(self) -> dict:
        return await self._send(Call("GET", "/readyz"))
