"""The frozen side of xpeft: the adapter bank, the encoder with adapter slots, and fusion."""

from xpeft.adapters.bank import AdapterBank, create_random_bank, stack_adapters
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.adapters.errors import BankError, ModelError, XPeftError
from xpeft.adapters.fusion import FusedAdapters, fuse

__all__ = [
    "AdapterBank",
    "AdapterEncoder",
    "BankError",
    "FusedAdapters",
    "ModelError",
    "XPeftError",
    "create_random_bank",
    "fuse",
    "load_encoder",
    "stack_adapters",
]
