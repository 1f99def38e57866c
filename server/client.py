"""Deprecated: moved to :mod:`xpeft.client.clients` (import from :mod:`xpeft.client`).

Kept for one release as a re-export; importing it warns (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from xpeft.client.clients import *  # noqa: F403 - the whole public surface, as before the move
from xpeft.client.clients import __all__  # noqa: F401

warnings.warn(
    "xpeft.server.client is deprecated and goes away in the next release: import xpeft.client "
    "(or xpeft.client.clients) instead",
    DeprecationWarning,
    stacklevel=2,
)
