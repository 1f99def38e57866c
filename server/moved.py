"""The warning of a module that moved out of the server package and is kept as a re-export."""

from __future__ import annotations

import warnings

__all__ = ["warn_moved"]


def warn_moved(old: str, new: str) -> None:
    """Warn the importer of ``old`` (``DeprecationWarning``) that it is now ``new``."""
    warnings.warn(
        f"{old} is deprecated and goes away in the next release: import xpeft.client (or {new}) instead",
        DeprecationWarning,
        stacklevel=3,  # the importer, past this function and the shim's module body
    )
