"""The backends' names, the interface each implements, their error type and the export cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from xpeft.adapters.errors import XPeftError

if TYPE_CHECKING:
    import torch

    from xpeft.adapters.fusion import FusedAdapters

#: A backend that runs; ``auto`` picks one of them per device (:func:`resolve_backend`).
BackendName = Literal["torch", "torch-int8", "onnx", "onnx-int8", "onnx-int8-block"]
#: What the ``XPEFT_BACKEND`` setting takes.
BackendSetting = Literal["auto", "torch", "torch-int8", "onnx", "onnx-int8", "onnx-int8-block"]
BACKENDS: tuple[str, ...] = get_args(BackendName)


class BackendError(XPeftError):
    """A backend that cannot run here (its library missing, a GPU device, an export that failed)."""


class EncoderBackend(Protocol):
    """The encoder forward of a served batch: pooled embeddings ``(B, d)`` on the encoder's device."""

    name: str

    def __call__(
        self, encodings: dict[str, torch.Tensor], weights: FusedAdapters | None, rows: torch.Tensor | None
    ) -> torch.Tensor: ...


def have_onnxruntime() -> bool:
    """Whether the ``cpu-fast`` extra (ONNX Runtime) is installed."""
    return importlib.util.find_spec("onnxruntime") is not None


def default_cache_dir() -> Path:
    """Where exported encoder graphs are kept: ``$XDG_CACHE_HOME/xpeft/backends`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "xpeft" / "backends"
