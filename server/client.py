"""A Python client for the xpeft server (httpx), and the ``xpeft predict --url`` / ``upload`` commands.

Every refusal raises :class:`ClientError` with the server's stable ``code``, so callers (and the
CLI, which prints ``error: <code>: <message>``) never parse HTML or guess from status codes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from xpeft.adapters.errors import XPeftError
from xpeft.server.settings import PROFILE_ID_PATTERN

_PROFILE_ID = re.compile(PROFILE_ID_PATTERN)

TextInput = str | tuple[str, str] | list[str]


class ClientError(XPeftError):
    """A refusal from the server (``status`` is the HTTP status; 0 when it could not be reached)."""

    def __init__(self, code: str, message: str, status: int = 0, body: dict | None = None) -> None:
        super().__init__(code, message)
        self.status = status
        self.body = body or {}


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


class Client:
    """Talks to one server (or load balancer). Use as a context manager to close connections.

    ``token`` is sent as ``Authorization: Bearer``; it defaults to ``$XPEFT_TOKEN``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get("XPEFT_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError("connection_error", f"{method} {self._http.base_url}{path}: {exc}") from exc
        if response.is_success:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = {}
        code = body.get("error") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        raise ClientError(
            code or f"http_{response.status_code}",
            message or response.text[:200],
            response.status_code,
            body if isinstance(body, dict) else None,
        )

    # -- profiles --------------------------------------------------------------------------
    def upload(self, profile_id: str, profile: bytes | str | Path) -> dict:
        """PUT a profile file (bytes or a path); returns its metadata with ``version``."""
        data = profile if isinstance(profile, bytes) else Path(profile).read_bytes()
        return self._request(
            "PUT",
            profile_path(profile_id),
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def get(self, profile_id: str) -> dict:
        return self._request("GET", profile_path(profile_id))

    def delete(self, profile_id: str) -> dict:
        return self._request("DELETE", profile_path(profile_id))

    def list(self, cursor: str | None = None, limit: int = 100) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", "/profiles", params=params)

    def iter_profiles(self, page_size: int = 100) -> Iterator[dict]:
        """Every profile's metadata, following the cursor page by page."""
        cursor = None
        while True:
            page = self.list(cursor, page_size)
            yield from page["profiles"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    def predict(self, profile_id: str, inputs: Sequence[TextInput]) -> dict:
        """``{"profile", "version", "predictions": [{"label", "score", "scores"}, ...]}``."""
        payload = {"inputs": [x if isinstance(x, str) else list(x) for x in inputs]}
        return self._request("POST", profile_path(profile_id, "/predict"), json=payload)

    # -- operations ------------------------------------------------------------------------
    def health(self) -> dict:
        return self._request("GET", "/healthz")

    def ready(self) -> dict:
        return self._request("GET", "/readyz")


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def predict_cli(args: Any) -> None:
    """``xpeft predict --url URL --id ID [--token T] [--pair-sep S] TEXT...``: same output as offline."""
    if not args.profile_id:
        raise XPeftError("bad_argument", "predict --url needs --id")
    inputs: list[TextInput] = [
        tuple(t.split(args.pair_sep, 1)) if args.pair_sep and args.pair_sep in t else t for t in args.texts
    ]
    with Client(args.url, token=args.token) as client:
        result = client.predict(args.profile_id, inputs)
    _print_json([{"input": t, **p} for t, p in zip(args.texts, result["predictions"], strict=True)])


def upload_cli(args: Any) -> None:
    """``xpeft upload PROFILE.xpm --id ID --url URL [--token T]``: prints the stored metadata."""
    path = Path(args.file)
    if not path.is_file():
        raise XPeftError("not_found", f"no profile file at {path}")
    with Client(args.url, token=args.token) as client:
        _print_json(client.upload(args.profile_id, path))
