"""Deprecated for one release: a re-export of :mod:`xpeft.client.clients`, which warns on import."""

from __future__ import annotations

from xpeft.client.clients import *  # noqa: F403 - its whole public surface
from xpeft.client.clients import __all__  # noqa: F401
from xpeft.server.moved import warn_moved

warn_moved(__name__, "xpeft.client.clients")
