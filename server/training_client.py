"""Deprecated: moved to :mod:`xpeft.client.training` (import from :mod:`xpeft.client`).

Kept for one release as a re-export; importing it warns (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from xpeft.client.training import *  # noqa: F403 - the whole public surface, as before the move
from xpeft.client.training import __all__  # noqa: F401

warnings.warn(
    "xpeft.server.training_client is deprecated and goes away in the next release: import xpeft.client "
    "(or xpeft.client.training) instead",
    DeprecationWarning,
    stacklevel=2,
)
