"""Deprecated: moved to :mod:`xpeft.client.core` (import from :mod:`xpeft.client`).

Kept for one release as a re-export; importing it warns (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from xpeft.client.core import *  # noqa: F403 - the whole public surface, as before the move
from xpeft.client.core import __all__  # noqa: F401

warnings.warn(
    "xpeft.server.client_core is deprecated and goes away in the next release: import xpeft.client "
    "(or xpeft.client.core) instead",
    DeprecationWarning,
    stacklevel=2,
)
