"""Bearer tokens: the admin token guards writes, the API token reads, and per-tenant predict tokens
one tenant's profiles (those whose id starts with one of the token's prefixes).

Tokens never reach a log: they live in ``SecretStr`` settings and in the :class:`Authorizer`, and
only the Authorization header carries them. Comparisons take constant time: the admin and API
tokens are each compared with ``hmac.compare_digest``, all of them, without stopping at a match.
A tenant token is found through a keyed hash (HMAC-SHA256 under a key drawn at startup; its timing
tells nothing about any token without the key) and then confirmed with ``compare_digest``, so that
thousands of tenants cost one dictionary lookup, not thousands of comparisons.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import sys
from collections.abc import Iterable

from fastapi import Request
from pydantic import SecretStr

from xpeft.adapters.errors import XPeftError
from xpeft.server.errors import ApiError
from xpeft.server.settings import Settings

log = logging.getLogger("xpeft.server")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def is_loopback(host: str | None) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; anything else (``0.0.0.0`` included) is not."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Protected mode, as Redis does it: without an admin token, writes are open only on loopback.

    On any other address the server refuses to start unless ``allow_open_writes`` says so; when
    it starts with open writes it says so on stderr, whatever the log level.
    """
    if settings.admin_token is not None:
        return
    loopback = is_loopback(settings.host)
    if not loopback and not settings.allow_open_writes:
        raise XPeftError(
            "open_writes_refused",
            f"no admin token and listening on {settings.host}: anyone who reaches it could upload and "
            "delete profiles. Set XPEFT_ADMIN_TOKEN (or XPEFT_ADMIN_TOKEN_FILE), listen on 127.0.0.1, "
            "or set XPEFT_ALLOW_OPEN_WRITES=true if you really mean it",
        )
    where = "loopback clients only" if loopback else f"ANYONE who reaches {settings.host}"
    banner = (
        f"\n*** xpeft: NO ADMIN TOKEN: uploads and deletes are open to {where}. ***\n"
        "*** Set XPEFT_ADMIN_TOKEN (or XPEFT_ADMIN_TOKEN_FILE) before exposing this server. ***\n"
    )
    print(banner, file=sys.stderr, flush=True)
    log.warning("XPEFT_ADMIN_TOKEN is not set: writes are open to %s", where)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _secret(value: SecretStr | None) -> bytes | None:
    return None if value is None else value.get_secret_value().encode()


def _any_equal(given: bytes, candidates: Iterable[bytes]) -> bool:
    """Constant time: every candidate is compared, whatever matched before."""
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(given, candidate)
    return matched


def _missing() -> ApiError:
    return ApiError(
        401, "unauthorized", "this endpoint needs an Authorization: Bearer <token> header", headers=_CHALLENGE
    )


class Authorizer:
    """The tokens of one app, fixed at startup; each ``check_*`` raises 401 / 403 or returns."""

    def __init__(self, settings: Settings) -> None:
        self.admin = _secret(settings.admin_token)
        self.open_writes_anywhere = settings.allow_open_writes
        self.api = _secret(settings.api_token)
        self._key = secrets.token_bytes(32)
        self._tenants: dict[bytes, tuple[bytes, tuple[str, ...]]] = {
            self._digest(token.encode()): (token.encode(), prefixes)
            for token, prefixes in settings.tenant_prefixes().items()
        }
        # each tenant prefix's tenant key (the same as its tokens'), for admin calls on its profiles
        self._prefix_owner: dict[str, str] = {
            prefix: "token:" + ",".join(sorted(prefixes))
            for _, prefixes in self._tenants.values()
            for prefix in prefixes
        }

    def tenant_key(self, request: Request, profile_id: str) -> str:
        """Whose request this is, for the fair share of the model worker (call after the access check).

        A predict token's tenant is its set of prefixes (tokens with the same set are one tenant).
        The admin and API tokens, and open reads, count against the tenant whose prefix the id
        has, or, when no tenant's prefix matches, the id's leading part up to its first ``-``,
        ``_`` or ``.`` (``acme-reviews`` and ``acme-tickets`` are one tenant, ``acme``).
        """
        token = _bearer(request)
        prefixes = self._tenant(token.encode()) if token is not None and self._tenants else None
        if prefixes is None:
            owners = [p for p in self._prefix_owner if profile_id.startswith(p)]
            if owners:
                return self._prefix_owner[max(owners, key=len)]
            head = re.split(r"[-_.]", profile_id, maxsplit=1)[0]
            return "id:" + head
        return "token:" + ",".join(sorted(prefixes))

    @property
    def tenants(self) -> int:
        return len(self._tenants)

    @property
    def reads_open(self) -> bool:
        """Reads and predictions need no token only when neither API nor tenant tokens exist."""
        return self.api is None and not self._tenants

    def _digest(self, token: bytes) -> bytes:
        return hmac.new(self._key, token, hashlib.sha256).digest()

    def _tenant(self, given: bytes) -> tuple[str, ...] | None:
        """The prefixes of the tenant token ``given``, or ``None``."""
        entry = self._tenants.get(self._digest(given))
        if entry is None or not hmac.compare_digest(given, entry[0]):
            return None
        return entry[1]

    def _privileged(self, given: bytes) -> bool:
        """The admin or the API token (both may read and predict everything)."""
        return _any_equal(given, [s for s in (self.admin, self.api) if s is not None])

    def check_admin(self, request: Request) -> None:
        """PUT and DELETE: the admin token; without one, loopback clients only (protected mode),
        unless ``allow_open_writes`` opened writes to everyone."""
        if self.admin is None:
            client = request.client.host if request.client else None
            if self.open_writes_anywhere or is_loopback(client):
                return
            raise ApiError(
                403,
                "forbidden",
                "no admin token is configured: writes are accepted from loopback clients only",
            )
        token = _bearer(request)
        if token is None:
            raise _missing()
        if not _any_equal(token.encode(), [self.admin]):
            raise ApiError(403, "forbidden", "this endpoint needs the admin token")

    def _unprivileged(self, request: Request) -> bytes | None:
        """``None`` when reads are open or the caller holds the API or admin token; otherwise the
        bearer token's bytes, for the caller to check against the tenant table."""
        if self.reads_open:
            return None
        token = _bearer(request)
        if token is None:
            raise _missing()
        given = token.encode()
        return None if self._privileged(given) else given

    def check_reader(self, request: Request) -> None:
        """Listing profiles: the API or the admin token; tenant tokens may not see other tenants' ids."""
        given = self._unprivileged(request)
        if given is None:
            return
        if self._tenant(given) is not None:
            raise ApiError(
                403, "forbidden", "a predict token may only use its own profiles, one id at a time"
            )
        raise ApiError(403, "forbidden", "the bearer token is not valid for this endpoint")

    def tenant_of(self, request: Request) -> tuple[str, ...] | None:
        """Before a job is read: ``None`` when the caller may read any job (reads open, the API or
        admin token), a tenant token's prefixes otherwise; 401 / 403 for anything else, so that a
        bogus token learns nothing about which job ids exist."""
        given = self._unprivileged(request)
        if given is None:
            return None
        prefixes = self._tenant(given)
        if prefixes is None:
            raise ApiError(403, "forbidden", "the bearer token is not valid for this endpoint")
        return prefixes

    def check_profile(self, request: Request, profile_id: str) -> None:
        """Predict and metadata of one profile: API or admin token, or a tenant token with a matching prefix."""
        given = self._unprivileged(request)
        if given is None:
            return
        prefixes = self._tenant(given)
        if prefixes is None:
            raise ApiError(403, "forbidden", "the bearer token is not valid for this endpoint")
        if not profile_id.startswith(prefixes):
            raise ApiError(
                403,
                "forbidden",
                "this token may not use that profile: its id has none of the token's prefixes",
            )


def _authorizer(request: Request) -> Authorizer:
    return request.app.state.server.auth


async def require_admin(request: Request) -> None:
    """Dependency of PUT and DELETE."""
    _authorizer(request).check_admin(request)


async def require_reader(request: Request) -> None:
    """Dependency of ``GET /profiles``."""
    _authorizer(request).check_reader(request)


async def require_profile_access(request: Request) -> None:
    """Dependency of predict and ``GET /profiles/{id}``: the id comes from the path (read here, not
    declared as a parameter, so that the route's own declaration, with its pattern, is the schema's)."""
    _authorizer(request).check_profile(request, request.path_params.get("profile_id", ""))
