"""Deprecated for one release: a re-export of :mod:`xpeft.client.training`, which warns on import."""

from __future__ import annotations

from xpeft.client.training import *  # noqa: F403 - its whole public surface
from xpeft.client.training import __all__  # noqa: F401
from xpeft.server.moved import warn_moved

warn_moved(__name__, "xpeft.client.training")
