"""``ProfileFormatError`` and its stable codes: below the header, the codecs and the kinds, which
all refuse bad files with it."""

from __future__ import annotations

from xpeft.adapters.errors import XPeftError

__all__ = ["ERROR_CODES", "ProfileFormatError"]


class ProfileFormatError(XPeftError):
    """A profile file that cannot be used. ``code`` is one of :data:`ERROR_CODES`."""


ERROR_CODES = (
    "truncated",  # shorter than its own header says
    "bad_magic",  # not an .xpm file
    "unsupported_version",  # written by a newer (or unknown) format version
    "checksum_mismatch",  # bytes changed after writing
    "bad_header",  # header is not the JSON this version writes
    "bad_payload",  # sizes or values inconsistent with the header (k-hot rows, NaN, ...)
    "bank_mismatch",  # trained on another bank (or another encoder)
)
