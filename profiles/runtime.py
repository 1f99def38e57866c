"""The multi-profile model: one frozen encoder and bank, any number of profiles per batch.

The offline API (notebooks, ``xpeft predict``, ``xpeft eval``) and the server's model worker
run this same class; the server only adds its caches in front of :meth:`fuse`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import DEFAULT_MODEL, AdapterEncoder, TextInput, load_encoder
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


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        model: str = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MultiProfileModel:
        bank = AdapterBank.load(bank_path)
        return cls(load_encoder(model, device=device or best_device(), dtype=dtype), bank)

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
            if p.kind is ProfileKind.ADAPTER:
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
        requests: Sequence[tuple[Profile, Sequence[TextInput]]],
        fuse: Callable[[Sequence[Profile]], list[FusedAdapters]] | None = None,
    ) -> list[list[Prediction]]:
        """Many profiles' requests in one forward; the answer keeps the request order.

        ``fuse`` replaces :meth:`fuse` for the batch's distinct profiles (the server puts its
        fused-weight cache there); it must return one ``U=1`` entry per profile, in order.
        """
        distinct: dict[int, int] = {}
        profiles: list[Profile] = []
        inputs: list[TextInput] = []
        rows: list[int] = []
        for profile, texts in requests:
            u = distinct.setdefault(id(profile), len(profiles))
            if u == len(profiles):
                profiles.append(profile)
            inputs.extend(texts)
            rows.extend([u] * len(texts))
        if not inputs:
            return [[] for _ in requests]
        logits = self.logits(inputs, rows, profiles, (fuse or self.fuse)(profiles))
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
