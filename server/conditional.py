"""Conditional requests (RFC 9110) on profiles: ``If-Match`` and ``If-None-Match``.

A profile's ``ETag`` is its stored version, strong and quoted (``"17"``): versions are store-wide
and a write that changes nothing takes none, so the tag changes exactly when the stored bytes do.
A write's condition is checked by the store in the same atomic step as the write
(:class:`~xpeft.server.stores.base.Condition`); here headers only become conditions.
"""

from __future__ import annotations

import re

from fastapi import Request, Response

from xpeft.server.errors import ApiError, etag
from xpeft.server.schemas import ErrorBody
from xpeft.server.stores.base import Condition

_ENTITY_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
PRECONDITION_RESPONSES: dict[int | str, dict] = {
    412: {"model": ErrorBody, "description": "If-Match / If-None-Match did not hold"}
}


def _entity_tags(request: Request, name: str) -> tuple[bool, list[tuple[bool, str]]] | None:
    """Header ``name`` as ``(is_star, [(weak, opaque tag), ...])``, ``None`` when absent; a
    malformed value is refused (a tag without quotes would otherwise silently never match)."""
    value = request.headers.get(name)
    if value is None:
        return None
    if value.strip() == "*":
        return True, []
    tags, pos = [], 0
    while pos < len(value):
        match = _ENTITY_TAG.match(value, pos)
        if match is None or match.end() == pos:
            raise ApiError(
                422, "invalid_request", f'{name} must be * or a list of quoted entity tags such as "17"'
            )
        tags.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    if not tags:
        raise ApiError(422, "invalid_request", f"{name} is empty")
    return False, tags


def _versions(tags: list[tuple[bool, str]], weak_ok: bool) -> frozenset[int]:
    """The versions that the tags name (a weak tag never matches in a strong comparison)."""
    return frozenset(
        int(t) for weak, t in tags if (weak_ok or not weak) and t.isascii() and t.isdigit() and len(t) < 20
    )


def write_condition(request: Request, create_allowed: bool) -> Condition | None:
    """``If-Match`` (``*`` or tags) and, on PUT, ``If-None-Match: *`` (create only)."""
    if_match = _entity_tags(request, "if-match")
    if_none = _entity_tags(request, "if-none-match")
    if if_none is not None:
        if not create_allowed or not if_none[0]:
            raise ApiError(
                422,
                "invalid_request",
                "on a write, If-None-Match takes only * (and only on PUT: create only)",
            )
        if if_match is not None:
            raise ApiError(422, "invalid_request", "send If-Match or If-None-Match, not both")
        return Condition(exists=False)
    if if_match is None:
        return None
    star, tags = if_match
    return Condition(exists=True) if star else Condition(versions=_versions(tags, weak_ok=False))


def not_modified(request: Request, version: int) -> Response | None:
    """A 304 when ``If-None-Match`` names the current version (weak comparison, as GET allows)."""
    if_none = _entity_tags(request, "if-none-match")
    if if_none is None:
        return None
    star, tags = if_none
    if star or version in _versions(tags, weak_ok=True):
        return Response(status_code=304, headers={"ETag": etag(version)})
    return None
