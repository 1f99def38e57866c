"""The wire's fixed points that the server and its Python client must agree on, in a module that
imports nothing, so that the client (``xpeft.client``) can take them without the server."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_INPUTS", "PROFILE_ID_PATTERN"]

# what a profile id may be (the server refuses others with invalid_profile_id; the client, before sending)
PROFILE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# the server's default inputs per predict (XPEFT_MAX_INPUTS); the client splits longer lists
DEFAULT_MAX_INPUTS = 64
