"""Bearer-token checks: the admin token guards writes, the optional API token guards reads.

Tokens are compared with ``hmac.compare_digest`` (no timing leak) and never logged: they live in
``SecretStr`` settings and only the Authorization header carries them.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from xpeft.server.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_token(request: Request, accepted: list[SecretStr | None]) -> None:
    """Pass when no token is configured, or the bearer token equals one of ``accepted``.

    Missing token: 401 ``unauthorized``; a token that matches none: 403 ``forbidden``.
    """
    secrets = [s.get_secret_value().encode() for s in accepted if s is not None]
    if not secrets:
        return
    token = _bearer(request)
    if token is None:
        raise ApiError(401, "unauthorized", "this endpoint needs an Authorization: Bearer <token> header",
                       headers=_CHALLENGE)
    given = token.encode()
    # compare against every secret, without stopping early, so timing says nothing about which
    matched = [hmac.compare_digest(given, secret) for secret in secrets]
    if not any(matched):
        raise ApiError(403, "forbidden", "the bearer token is not valid for this endpoint")


async def require_admin(request: Request) -> None:
    """Dependency of PUT and DELETE: the admin token, when ``XPEFT_ADMIN_TOKEN`` is set."""
    check_token(request, [request.app.state.settings.admin_token])


async def require_reader(request: Request) -> None:
    """Dependency of reads and predict: the API or the admin token, when ``XPEFT_API_TOKEN`` is set."""
    settings = request.app.state.settings
    if settings.api_token is not None:
        check_token(request, [settings.api_token, settings.admin_token])
