"""The torch backends: the eager encoder (the reference), and its int8 dynamically quantized copy."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.fusion import FusedAdapters


class TorchBackend:
    """Today's eager forward: the encoder itself, each row through its slot's adapters."""

    name = "torch"

    def __init__(self, encoder: AdapterEncoder) -> None:
        self.encoder = encoder

    def __call__(
        self, encodings: dict[str, torch.Tensor], weights: FusedAdapters | None, rows: torch.Tensor | None
    ) -> torch.Tensor:
        return self.encoder(encodings, weights, rows)


class TorchInt8Backend(TorchBackend):
    """A copy of the encoder whose frozen ``nn.Linear`` layers run int8 (dynamic quantization).

    The adapters are not ``nn.Linear`` modules (the slots apply the pool's tensors), so they stay
    fp32; so do the embeddings, LayerNorms and the heads. ``torch.ao.quantization`` is deprecated in
    recent torch releases: this backend lasts while torch ships it.
    """

    name = "torch-int8"

    def __init__(self, encoder: AdapterEncoder) -> None:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = copy.deepcopy(encoder)  # the served encoder stays exact (training, other backends)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation of torch.ao.quantization, said above
            # per output channel: per tensor, MiniLM's logits drift about twice as far
            quantize_dynamic(quantized.model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
        super().__init__(quantized)
