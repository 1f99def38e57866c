"""The multi-profile model: one frozen encoder and bank, any number of profiles per batch.

The offline API (notebooks, ``xpeft predict``, ``xpeft eval``) and the server's model worker
run this same class. The server keeps its own cache of fused weights: it asks
:func:`distinct_profiles` which profiles a batch holds, fuses the cold ones with :meth:`fuse`,
and hands every profile's weights to :meth:`predict_batch`. Nothing here calls back into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder, TextInput, best_device, encoder_for_bank
from xpeft.adapters.errors import BankError
from xpeft.adapters.fusion import FusedAdapters, fuse
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import Profile, ProfileKind


@dataclass
class Prediction:
    label: str
    score: float
    scores: dict[str, float]

    def as_dict(self) -> dict:
        return {"label": self.label, "score": self.score, "scores": self.scores}


__all__ = ["MultiProfileModel", "Prediction", "best_device", "distinct_profiles", "to_prediction"]

BatchRequest = tuple[Profile, Sequence[TextInput]]


def distinct_profiles(requests: Sequence[BatchRequest]) -> list[Profile]:
    """The batch's profiles, each once (by identity), in order of first appearance.

    :meth:`MultiProfileModel.predict_batch` takes fused weights in this order.
    """
    seen: dict[int, Profile] = {}
    for profile, _ in requests:
        seen.setdefault(id(profile), profile)
    return list(seen.values())


class MultiProfileModel:
    """Encoder + bank. Fuses distinct profiles once per batch, then one forward for all rows."""

    def __init__(self, encoder: AdapterEncoder, bank: AdapterBank) -> None:
        if bank.model_id != encoder.model_id:
            raise BankError(
                "bank_mismatch",
                f"bank was built for encoder {bank.model_id}, the encoder loaded is {encoder.model_id}",
            )
        if (bank.num_layers, bank.hidden_size) != (encoder.num_layers, encoder.hidden_size):
            raise BankError("bank_shape", "bank shapes do not fit the encoder")
        self.encoder = encoder
        self.bank = bank
        # The bank lives where the encoder runs, in its dtype: fusion is a GEMM over it.
        self.device_bank = bank.to(encoder.device, encoder.dtype)

    @classmethod
    def load(
        cls,
        bank_path: str | Path,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MultiProfileModel:
        """The bank file and its encoder (``model``, else the one the bank was built for)."""
        return cls.for_bank(AdapterBank.load(bank_path), model, device, dtype)

    @classmethod
    def for_bank(
        cls,
        bank: AdapterBank,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MultiProfileModel:
        """``bank`` with the encoder :func:`~xpeft.adapters.encoder.encoder_for_bank` chooses."""
        return cls(encoder_for_bank(bank, model, device, dtype), bank)

    # -- profiles --------------------------------------------------------------------------
    def load_profile(self, source: str | Path | bytes) -> Profile:
        """Decode and validate a profile file (path or bytes) against this model's bank."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return xpm.decode(data, self.bank)

    def fuse(self, profiles: Sequence[Profile]) -> list[FusedAdapters]:
        """One ``U=1`` fused adapter per profile; bank profiles are fused in one batched GEMM."""
        enc = self.encoder
        out: list[FusedAdapters | None] = [None] * len(profiles)
        bank_index = [i for i, p in enumerate(profiles) if p.kind.uses_bank]
        if bank_index:
            weights = [profiles[i].mixing_weights() for i in bank_index]
            w_down = torch.stack([w[0] for w in weights]).to(enc.device)
            w_up = torch.stack([w[1] for w in weights]).to(enc.device)
            for i, part in zip(bank_index, fuse(w_down, w_up, self.device_bank).split(), strict=True):
                out[i] = part
        for i, p in enumerate(profiles):
            if p.kind is ProfileKind.SINGLE_ADAPTER:
                out[i] = FusedAdapters.from_single(p.adapter_tensors()).to(enc.device, enc.dtype)
            elif p.kind is ProfileKind.HEAD_ONLY:
                out[i] = FusedAdapters.zeros(
                    self.bank.num_layers,
                    self.bank.hidden_size,
                    self.bank.bottleneck,
                    device=enc.device,
                    dtype=enc.dtype,
                )
        return out  # type: ignore[return-value]

    # -- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def logits(
        self,
        inputs: Sequence[TextInput],
        rows: Sequence[int],
        profiles: Sequence[Profile],
        fused: Sequence[FusedAdapters],
    ) -> list[torch.Tensor]:
        """Per-row logits; row i runs with ``profiles[rows[i]]`` and its ``fused[rows[i]]``."""
        enc = self.encoder
        encodings = enc.tokenize(inputs, [profiles[r].max_length for r in rows])
        row_index = torch.as_tensor(list(rows), device=enc.device, dtype=torch.long)
        batch = FusedAdapters.cat(list(fused))
        pooled = enc(encodings, batch, row_index if batch.num_profiles > 1 else None)
        c_max = max(p.num_labels for p in profiles)
        heads = torch.zeros(len(profiles), c_max, enc.hidden_size)
        biases = torch.zeros(len(profiles), c_max)
        for u, p in enumerate(profiles):
            heads[u, : p.num_labels] = p.head_weight
            biases[u, : p.num_labels] = p.head_bias
        heads, biases = heads.to(enc.device, torch.float32), biases.to(enc.device, torch.float32)
        logits = torch.einsum("bd,bcd->bc", pooled.float(), heads[row_index]) + biases[row_index]
        return [logits[i, : profiles[r].num_labels].cpu() for i, r in enumerate(rows)]

    def predict_batch(
        self,
        requests: Sequence[BatchRequest],
        fused: Sequence[FusedAdapters] | None = None,
    ) -> list[list[Prediction]]:
        """Many profiles' requests in one forward; the answer keeps the request order.

        ``fused`` holds the already-fused weights of the batch's distinct profiles, one ``U=1``
        entry each in :func:`distinct_profiles` order (the server passes its cached weights);
        without it they are fused here, once per distinct profile. Profiles are only read.
        """
        profiles = distinct_profiles(requests)
        if fused is not None and len(fused) != len(profiles):
            raise ValueError(f"{len(fused)} fused entries for {len(profiles)} distinct profiles")
        slot = {id(p): u for u, p in enumerate(profiles)}
        inputs: list[TextInput] = []
        rows: list[int] = []
        for profile, texts in requests:
            inputs.extend(texts)
            rows.extend([slot[id(profile)]] * len(texts))
        if not inputs:
            return [[] for _ in requests]
        if fused is None:
            fused = self.fuse(profiles)
        logits = self.logits(inputs, rows, profiles, fused)
        answers: list[list[Prediction]] = []
        start = 0
        for profile, texts in requests:
            answers.append([to_prediction(profile, z) for z in logits[start : start + len(texts)]])
            start += len(texts)
        return answers

    def predict(
        self, profile: Profile, inputs: Sequence[TextInput], batch_size: int = 64
    ) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(inputs), batch_size):
            out.extend(self.predict_batch([(profile, inputs[start : start + batch_size])])[0])
        return out


def to_prediction(profile: Profile, logits: torch.Tensor) -> Prediction:
    probs = torch.softmax(logits.float(), dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(
        label=profile.labels[best], score=probs[best], scores=dict(zip(profile.labels, probs, strict=True))
    )
