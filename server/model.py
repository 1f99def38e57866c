"""The bank and the model a server (or its trainer process) runs, built from the settings.

Shared by the app factory and the trainer so that both serve exactly the same encoder: it is
chosen by :func:`~xpeft.adapters.encoder.encoder_for_bank`, the one rule (the model the
settings name, else the bank's own at its pinned revision, else the embedded default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import encoder_for_bank
from xpeft.adapters.errors import XPeftError
from xpeft.adapters.kernels import KernelChoice
from xpeft.engine.backends import BackendError, build_backend, resolve_backend
from xpeft.engine.host_memory import retain_freed_memory
from xpeft.engine.runtime import MultiProfileModel
from xpeft.server.settings import Settings

__all__ = [
    "DTYPES",
    "attach_backend",
    "backend_name",
    "build_model",
    "check_readable",
    "kernel_report",
    "load_bank",
]
log = logging.getLogger("xpeft.server")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(settings: Settings, bank: AdapterBank) -> MultiProfileModel:
    """The encoder the settings name (default: the bank's own), on their device (default: the
    best one), with ``bank``, running the kernels the settings choose (``XPEFT_KERNELS``)."""
    encoder = encoder_for_bank(bank, settings.model, device=settings.device, dtype=DTYPES[settings.dtype])
    return MultiProfileModel(encoder, bank, KernelChoice.parse(settings.kernels))


def load_bank(path: Path) -> AdapterBank:
    """The bank file at ``path``, with a clear error when the server's user cannot read it."""
    check_readable(path)
    return AdapterBank.load(path)


def check_readable(path: Path) -> None:
    """A bank the server's user cannot read is a deployment error with its own clear message
    (safetensors alone reports it as "No such file or directory")."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise XPeftError("bank_not_found", f"no bank file at {path}") from None
    except PermissionError:
        raise XPeftError(
            "bank_unreadable",
            f"cannot read bank {path}: permission denied (the server runs as uid {os.getuid()}; "
            "make the file readable by it, e.g. chmod 0644)",
        ) from None
    except OSError as exc:
        raise XPeftError("bank_unreadable", f"cannot read bank {path}: {exc.strerror}") from None


def kernel_report(model: MultiProfileModel) -> dict[str, str]:
    """What ``/readyz``, the start-up log and ``xpeft_kernels_info`` say of the model's kernels: the
    setting, the kernels it chose, and those that run on its device (CUDA with Triton only)."""
    return model.kernels.report(model.encoder.device)


def attach_backend(model: MultiProfileModel, settings: Settings) -> str:
    """Build the encoder backend ``settings.backend`` names for ``model`` (once, at start: an ONNX
    backend exports its graph on the first start of a machine) and serve through it.

    A backend named outright that cannot run refuses the start; ``auto`` falls back to torch,
    saying why in the log. On a CPU the process also keeps its freed host memory
    (``XPEFT_RETAIN_HOST_MEMORY``, :mod:`xpeft.engine.host_memory`). Returns the backend's name.
    """
    device = model.encoder.device.type
    if device == "cpu" and settings.retain_host_memory:
        retain_freed_memory()
    chosen = resolve_backend(settings.backend, device)
    try:
        backend = build_backend(chosen, model.encoder, settings.torch_threads, settings.backend_cache)
    except BackendError as exc:
        if settings.backend != "auto":
            raise
        log.warning("backend %s cannot run (%s); serving with torch", chosen, exc.message)
        backend = build_backend("torch", model.encoder)
    model.backend = None if backend.name == "torch" else backend  # torch: the encoder itself
    return backend.name


def backend_name(model: MultiProfileModel) -> str:
    """The name of the backend ``model`` serves with (``torch`` when none is attached)."""
    return str(getattr(model.backend, "name", "torch"))
