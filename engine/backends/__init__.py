"""Encoder backends: what runs the frozen encoder with each row's adapters for a served batch.

A backend is built once, at start, from the :class:`~xpeft.adapters.encoder.AdapterEncoder`, and
called as ``backend(encodings, weights, rows) -> pooled (B, d)`` on the encoder's device, where
``weights`` is the slot pool's :class:`~xpeft.adapters.fusion.FusedAdapters` ``(L, S, ...)`` and
``rows`` each row's slot id. Every backend applies the per-row adapters exactly (fp32) and
mean-pools; they differ only in how the frozen encoder runs:

- ``torch``: the eager forward, the reference and the default on a GPU;
- ``torch-int8``: the encoder's ``nn.Linear`` layers dynamically quantized to int8 by torch
  (``torch.ao.quantization``, deprecated in recent torch releases);
- ``onnx``: ONNX Runtime running the exported encoder, with the adapter application inside the
  graph and the pool's tensors bound as inputs without a copy;
- ``onnx-int8``: the same graph with the frozen encoder's weight matrices quantized to int8
  (dynamic quantization); the adapters, whose weights are graph inputs, stay fp32;
- ``onnx-int8-block``: as ``onnx-int8``, but weights and activations quantized in blocks of 128
  values (ONNX Runtime's ``MatMulNBits``), which drifts much less.

``auto`` serves with ``onnx-int8`` on a CPU (when ONNX Runtime is installed) and ``torch`` elsewhere.

Training never uses a backend: it runs the exact fp32 torch encoder, so a profile file serves the
same on any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from xpeft.engine.backends.base import (
    BACKENDS,
    BackendError,
    BackendName,
    BackendSetting,
    EncoderBackend,
    default_cache_dir,
    have_onnxruntime,
)

if TYPE_CHECKING:
    from xpeft.adapters.encoder import AdapterEncoder

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendName",
    "BackendSetting",
    "EncoderBackend",
    "build_backend",
    "default_cache_dir",
    "have_onnxruntime",
    "resolve_backend",
]


def resolve_backend(setting: str, device_type: str) -> BackendName:
    """The backend ``setting`` names on a device of ``device_type``.

    ``auto``: ``torch`` on a GPU; on a CPU ``onnx-int8`` when ONNX Runtime is installed, else
    ``torch``: of the backends whose trained profiles score as torch's do within the seeds' noise
    (``python -m bench.eval.backends accuracy``), the fastest measured. A backend that cannot run
    on the device is refused with a clear error rather than silently replaced.
    """
    if setting == "auto":
        if device_type == "cpu" and have_onnxruntime():
            return "onnx-int8"
        return "torch"
    if setting not in BACKENDS:
        raise BackendError("bad_backend", f"unknown backend {setting!r}; one of auto, {', '.join(BACKENDS)}")
    if setting != "torch" and device_type != "cpu":
        raise BackendError(
            "backend_unavailable", f"backend {setting} runs on the CPU only, not {device_type}"
        )
    if setting.startswith("onnx") and not have_onnxruntime():
        raise BackendError(
            "backend_unavailable",
            f"backend {setting} needs ONNX Runtime: pip install 'xpeft[cpu-fast]'",
        )
    return setting  # type: ignore[return-value]  # checked against BACKENDS above


def build_backend(
    name: str,
    encoder: AdapterEncoder,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> EncoderBackend:
    """The backend ``name`` (as :func:`resolve_backend` returns it) for ``encoder``.

    ``threads``: intra-op threads of ONNX Runtime (default torch's own count); ``cache_dir``: the
    folder of exported graphs (default :func:`default_cache_dir`), so export runs once per machine.
    """
    chosen = resolve_backend(name, encoder.device.type)
    if chosen == "torch":
        from xpeft.engine.backends.torch_backend import TorchBackend

        return TorchBackend(encoder)
    if chosen == "torch-int8":
        from xpeft.engine.backends.torch_backend import TorchInt8Backend

        return TorchInt8Backend(encoder)
    from xpeft.engine.backends.onnx_backend import OnnxBackend

    return OnnxBackend.build(encoder, chosen, threads=threads, cache_dir=cache_dir)
