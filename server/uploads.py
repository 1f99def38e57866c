"""The check every stored profile file passes: ``PUT /profiles/{id}``, the trainer's result, and
the benchmarks that fill a store directly, so that all of them store the same metadata."""

from __future__ import annotations

import hashlib
import logging

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.errors import XPeftError
from xpeft.profiles import format as xpm

log = logging.getLogger("xpeft.server")
__all__ = ["validate_profile"]


def validate_profile(data: bytes, bank: AdapterBank, max_labels: int | None = None) -> dict:
    """The metadata to store with ``data``, after decoding all of it against the served bank (any
    ProfileFormatError refuses the upload); at most ``max_labels`` labels (``XPEFT_MAX_LABELS``:
    one profile's head memory and per-batch work)."""
    try:
        xpm.decode(data, bank)
        info = xpm.read_info(data)
        if type(info.max_length) is not int:  # JSON true passes an isinstance(int) check
            raise xpm.ProfileFormatError("bad_header", f"max_length={info.max_length!r} is not an integer")
    except xpm.ProfileFormatError:
        raise
    except Exception as exc:
        # Untrusted bytes that trip the decoder itself (a header field of an unexpected type, say) are
        # still a malformed file: refuse it (422), never a 500; the traceback shows the decoder's gap.
        log.warning("the profile decoder failed on an upload; refusing it", exc_info=True)
        raise xpm.ProfileFormatError(
            "bad_header", f"the file could not be decoded ({type(exc).__name__})"
        ) from exc
    if max_labels is not None and len(info.labels) > max_labels:
        raise XPeftError(
            "too_many_labels", f"{len(info.labels)} labels; this server takes at most {max_labels}"
        )
    return {**info.as_dict(), "sha256": hashlib.sha256(data).hexdigest()}
