"""The frozen side of xpeft: the adapter bank, the encoder with adapter slots, and fusion.

The names below load on first use (PEP 562), so that importing ``xpeft.adapters.errors`` (which
every layer and the ``xpeft`` command do) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xpeft.adapters.bank import AdapterBank, create_random_bank, stack_adapters
    from xpeft.adapters.encoder import AdapterEncoder, TextInput, encoder_for_bank, load_encoder
    from xpeft.adapters.errors import BankError, ModelError, XPeftError
    from xpeft.adapters.fusion import FusedAdapters, fuse

_EXPORTS = {
    "AdapterBank": "bank",
    "create_random_bank": "bank",
    "stack_adapters": "bank",
    "AdapterEncoder": "encoder",
    "TextInput": "encoder",
    "encoder_for_bank": "encoder",
    "load_encoder": "encoder",
    "BankError": "errors",
    "ModelError": "errors",
    "XPeftError": "errors",
    "FusedAdapters": "fusion",
    "fuse": "fusion",
}

__all__ = [
    "AdapterBank",
    "AdapterEncoder",
    "BankError",
    "FusedAdapters",
    "ModelError",
    "TextInput",
    "XPeftError",
    "create_random_bank",
    "encoder_for_bank",
    "fuse",
    "load_encoder",
    "stack_adapters",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
