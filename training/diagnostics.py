"""What training did to a profile's masks: figures for docs/METHOD.md, recorded by ``train_profile``.

- how far the masks moved: the share of the initial top-k still selected at the end;
- how strongly the fused adapter acts: ``||adapter(h) - h|| / ||h||`` at every slot, on one batch;
- how much signal the scores get: the gradient norm of the scores, early and late in training.
"""

from __future__ import annotations

import torch

from xpeft.adapters.encoder import AdapterEncoder
from xpeft.adapters.fusion import FusedAdapters


def mask_overlap(start: torch.Tensor, end: torch.Tensor) -> float:
    """Share of the selected adapters at ``start`` that are still selected at ``end`` (k-hot masks)."""
    kept = (start & end).sum().item()
    return float(kept) / max(1, int(start.sum().item()))


@torch.no_grad()
def adapter_ratio(
    encoder: AdapterEncoder, fused: FusedAdapters | None, encodings: dict[str, torch.Tensor]
) -> list[float]:
    """Per layer, the norm of what the adapter adds over the norm of the hidden state it gets."""
    if fused is None:
        return [0.0] * encoder.num_layers
    ratios: list[float] = []

    def hook(slot, inputs, output):  # noqa: ANN001 - torch's hook signature
        h = slot.dense(inputs[0])
        ratios.append(float((output - h).norm() / h.norm().clamp_min(1e-12)))

    handles = [slot.register_forward_hook(hook) for slot in encoder.slots]
    try:
        was_training = encoder.training
        encoder.eval()
        encoder(encodings, fused)
        encoder.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return ratios
