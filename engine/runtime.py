"""The multi-profile model: one frozen encoder and bank, any number of profiles per batch.

The offline API (notebooks, ``xpeft predict``, ``xpeft eval``) and the server's model worker
run this same class. A forward reads its rows' adapters and heads from a slot pool
(:class:`~xpeft.engine.slots.SlotPool`), named by a :class:`SlotBatch`: the server's long-lived
pool (its cache fuses cold profiles straight into their slots with :meth:`fuse_into_pool`), or a
transient pool of one batch's profiles (:meth:`transient_batch`). There is no other path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder, TextInput, best_device, encoder_for_bank
from xpeft.adapters.errors import BankError
from xpeft.adapters.fusion import FusedAdapters, UnitTable, fuse, fuse_gather, fuse_units
from xpeft.adapters.kernels import KernelChoice
from xpeft.engine.graphs import GraphRunner
from xpeft.engine.prediction import Prediction, from_probs, to_prediction
from xpeft.engine.slots import SlotPool
from xpeft.profiles import format as xpm
from xpeft.profiles.profile import Profile


@dataclass
class SlotBatch:
    """A batch's distinct profiles as slots of a pool, in :func:`distinct_profiles` order: the one
    way a forward's rows get their adapters and heads."""

    pool: SlotPool
    slots: list[int]


__all__ = [
    "MultiProfileModel",
    "Prediction",
    "SlotBatch",
    "best_device",
    "distinct_profiles",
    "from_probs",
    "to_prediction",
]

BatchRequest = tuple[Profile, Sequence[TextInput]]
log = logging.getLogger("xpeft.engine")


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

    def __init__(
        self, encoder: AdapterEncoder, bank: AdapterBank, kernels: KernelChoice | None = None
    ) -> None:
        if bank.model_id != encoder.model_id:
            raise BankError(
                "bank_mismatch",
                f"bank was built for encoder {bank.model_id}, the encoder loaded is {encoder.model_id}",
            )
        if (bank.num_layers, bank.hidden_size) != (encoder.num_layers, encoder.hidden_size):
            raise BankError("bank_shape", "bank shapes do not fit the encoder")
        self.encoder = encoder
        self.bank = bank
        self.kernels = kernels or KernelChoice.from_environment()
        # The bank lives where the encoder runs, in its dtype: fusion is a GEMM over it.
        self.device_bank = bank.to(encoder.device, encoder.dtype)
        self._unit_table: UnitTable | None = None  # the bank as rows of units, once a units profile is served
        #: replays the forward from CUDA graphs when set (the model worker sets it, see graphs.py)
        self.graphs: GraphRunner | None = None
        #: runs the encoder of a served batch when set (the server sets one of xpeft.engine.backends
        #: at start); None: the eager encoder itself, as training and the offline API run it
        self.backend: (
            Callable[[dict[str, torch.Tensor], FusedAdapters, torch.Tensor | None], torch.Tensor] | None
        ) = None

    @property
    def kernels(self) -> KernelChoice:
        """The Triton kernels this model's forward and fusion may run, chosen once as it is built
        (default: ``XPEFT_KERNELS`` as it is then); the encoder's adapter slots read the same."""
        return self._kernels

    @kernels.setter
    def kernels(self, choice: KernelChoice) -> None:
        self._kernels = choice
        self.encoder.kernels = choice
        report = choice.report(self.encoder.device)
        log.debug(
            "kernels %s (XPEFT_KERNELS=%s, running: %s)", report["chosen"], choice.setting, report["running"]
        )

    @classmethod
    def load(
        cls,
        bank_path: str | Path,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        kernels: KernelChoice | None = None,
    ) -> MultiProfileModel:
        """The bank file and its encoder (``model``, else the one the bank was built for);
        ``kernels`` as :class:`MultiProfileModel` takes it."""
        return cls.for_bank(AdapterBank.load(bank_path), model, device, dtype, kernels)

    @classmethod
    def for_bank(
        cls,
        bank: AdapterBank,
        model: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        kernels: KernelChoice | None = None,
    ) -> MultiProfileModel:
        """``bank`` with the encoder :func:`~xpeft.adapters.encoder.encoder_for_bank` chooses."""
        return cls(encoder_for_bank(bank, model, device, dtype), bank, kernels)

    # -- profiles --------------------------------------------------------------------------
    def load_profile(self, source: str | Path | bytes) -> Profile:
        """Decode and validate a profile file (path or bytes) against this model's bank."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        return xpm.decode(data, self.bank)

    def fuse_batch(self, profiles: Sequence[Profile]) -> FusedAdapters:
        """The profiles' adapters, layer-major ``(L, U, ...)``: bank profiles in one call per group."""
        enc = self.encoder
        groups = self._fused_groups(profiles)
        if len(groups) == 1 and groups[0][0] == list(range(len(profiles))):
            # one call fused them all, in order: its output is the batch's weights (a gather of
            # units returns a view of its down side, which a forward binding memory cannot take)
            return FusedAdapters(*(t.contiguous() for t in groups[0][1].tensors()))
        out = FusedAdapters.zeros(
            self.bank.num_layers,
            self.bank.hidden_size,
            self.bank.bottleneck,
            len(profiles),
            device=enc.device,
            dtype=enc.dtype,
        )
        self._fuse_into(out, list(range(len(profiles))), profiles, groups)
        return out

    def _fuse_bank(self, profiles: Sequence[Profile]) -> FusedAdapters:
        """Mixing weights of bank profiles, stacked on the host, sent in one copy, fused in one GEMM."""
        weights = torch.stack([torch.stack(p.mixing_weights()) for p in profiles])  # (U, 2, L, N)
        weights = weights.to(self.encoder.device, non_blocking=True)
        return fuse(weights[:, 0], weights[:, 1], self.device_bank)

    def _fuse_units(self, profiles: Sequence[Profile]) -> FusedAdapters:
        """Units profiles of one k: their unit ids and scales sent in one copy, one gather and sum."""
        if self._unit_table is None:
            self._unit_table = UnitTable.of(self.device_bank)
        device = self.encoder.device
        index = torch.stack([p.unit_index for p in profiles if p.unit_index is not None]).to(device)
        scale = torch.tensor([p.unit_weight() for p in profiles])
        gains = torch.stack([p.gains for p in profiles if p.gains is not None])
        outs = [p.out_scale for p in profiles]
        out = None
        if any(o is not None for o in outs):
            ones = torch.ones(self.bank.num_layers, self.bank.hidden_size)
            out = torch.stack([ones if o is None else o for o in outs]).to(device)
        return fuse_units(index[:, 0], index[:, 1], scale.to(device), gains.to(device), out, self._unit_table)

    def _fuse_hard(self, profiles: Sequence[Profile]) -> FusedAdapters:
        """Hard profiles of one k: each reads its k selected adapters per layer, with their weights
        (scale, values and gains as :meth:`Profile.mixing_weights` gives them), never the whole bank."""
        L, k = self.bank.num_layers, profiles[0].k
        index = torch.stack(
            [torch.stack([m.nonzero()[:, 1].view(L, k) for m in p.masks()]) for p in profiles]
        )  # (U, 2, L, k): nonzero() walks each k-hot row in order
        weights = torch.stack([torch.stack(p.mixing_weights()) for p in profiles]).gather(-1, index)
        device = self.encoder.device
        index, weights = index.to(device, non_blocking=True), weights.to(device, non_blocking=True)
        return fuse_gather(
            index[:, 0], index[:, 1], self.device_bank, weights[:, 0], weights[:, 1], self.kernels
        )

    def _gathers(self, rows: int) -> bool:
        """Whether hard profiles reading ``rows`` bank adapters in all fuse faster by a gather than
        by the GEMM over the whole bank: while they read at most 4 N rows on a CPU (the two tie
        near 6 N) and N on a GPU (docs/BENCHMARKS.md, Fusion)."""
        per_bank = 4 if self.encoder.device.type == "cpu" else 1
        return rows <= per_bank * self.bank.num_adapters

    def _fused_groups(self, profiles: Sequence[Profile]) -> list[tuple[list[int], FusedAdapters]]:
        """The profiles that fuse over the bank, in groups that fuse in one call each, by their
        kind's fusion: ``gather`` profiles in one gather per k (or with the ``mix`` ones in one
        GEMM, where that is faster), ``units`` profiles in one gather per k."""
        fusers = {"mix": self._fuse_bank, "gather": self._fuse_hard, "units": self._fuse_units}
        groups: dict[tuple[str, int], list[int]] = {}  # (fusion, k) -> the profiles fused that way
        for j, p in enumerate(profiles):
            fusion = p.kind.spec.fusion  # the kinds table names each kind's fusion
            if fusion in fusers:  # the gathers fuse k adapters or units: one call per k
                groups.setdefault((fusion, p.k if fusion != "mix" else 0), []).append(j)
        for key in [key for key in groups if key[0] == "gather"]:
            if not self._gathers(len(groups[key]) * key[1]):
                groups.setdefault(("mix", 0), []).extend(groups.pop(key))
        out = []
        for (how, _), members in groups.items():
            chosen = sorted(members)
            out.append((chosen, fusers[how]([profiles[j] for j in chosen])))
        return out

    def fuse_into(self, target: FusedAdapters, slots: Sequence[int], profiles: Sequence[Profile]) -> None:
        """Fuse ``profiles[j]`` into slot ``slots[j]`` of ``target`` (a slot pool's ``(L, S, ...)`` tensors).

        Bank profiles: one host-to-device copy of their mixing weights (or unit ids), one GEMM
        (or gather), one indexed copy per tensor into their slots; whole adapters are copied in;
        head-only slots are zeroed.
        """
        self._fuse_into(target, slots, profiles, self._fused_groups(profiles))

    def _fuse_into(
        self,
        target: FusedAdapters,
        slots: Sequence[int],
        profiles: Sequence[Profile],
        groups: list[tuple[list[int], FusedAdapters]],
    ) -> None:
        device = target.down.device
        for members, fused in groups:
            index = torch.as_tensor([slots[j] for j in members], dtype=torch.long).to(device)
            for pool_t, new in zip(target.tensors(), fused.tensors(), strict=True):
                pool_t.index_copy_(1, index, new.to(pool_t.dtype))
        for j, p in enumerate(profiles):
            s = slots[j]
            if p.kind.spec.fusion == "own":
                single = FusedAdapters.from_single(p.adapter_tensors())
                for pool_t, new in zip(target.tensors(), single.tensors(), strict=True):
                    pool_t[:, s : s + 1].copy_(new)
            elif p.kind.spec.fusion == "none":
                for pool_t in target.tensors():
                    pool_t[:, s : s + 1].zero_()

    def fuse_into_pool(self, pool: SlotPool, slots: Sequence[int], profiles: Sequence[Profile]) -> None:
        """Cold profiles straight into their pool slots: adapters and heads."""
        self.fuse_into(pool.weights, slots, profiles)
        pool.write_heads(slots, [p.head_weight for p in profiles], [p.head_bias for p in profiles])

    # -- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward_rows(
        self,
        inputs: Sequence[TextInput],
        rows: Sequence[int],
        profiles: Sequence[Profile],
        batch: SlotBatch,
        token_ids: Sequence[dict[str, list[int]]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C_max)`` logits and the ``(B, d)`` pooled embeddings they came from, on the device.

        Row i runs with ``profiles[rows[i]]``, whose weights and head sit in slot
        ``batch.slots[rows[i]]`` of ``batch.pool``: read in place (no concatenation, no head tensor
        built per batch). Columns past a row's labels hold padding. ``token_ids``: the inputs
        already tokenized (the encoder's ``token_ids``, each at its row's profile's length), padded
        here instead of tokenized.
        """
        enc = self.encoder
        encode = self.backend or enc
        if token_ids is not None:
            encodings = enc.collate(token_ids)
        else:
            encodings = enc.tokenize(inputs, [profiles[r].max_length for r in rows])
        pool = batch.pool
        slot_rows = pool.index([batch.slots[r] for r in rows])
        if self.graphs is not None and self.graphs.weights is pool.weights:
            pooled = self.graphs(encodings, slot_rows)
        else:
            pooled = encode(encodings, pool.weights, slot_rows)
        heads, biases = pool.heads[slot_rows], pool.head_bias[slot_rows]
        return torch.bmm(heads, pooled.float().unsqueeze(-1)).squeeze(-1) + biases, pooled

    def predict_batch(
        self,
        requests: Sequence[BatchRequest],
        batch: SlotBatch | None = None,
        token_ids: Sequence[dict[str, list[int]]] | None = None,
    ) -> list[list[Prediction]]:
        """Many profiles' requests in one forward; the answer keeps the request order.

        ``batch`` names the slots of the batch's distinct profiles, in :func:`distinct_profiles`
        order, in a pool that holds their weights and heads (the server's cache). Without it they
        are fused here in one batched call into a transient pool of U slots
        (:meth:`transient_batch`). Profiles are only read. ``token_ids``: every input's token ids in
        request order, when the caller has tokenized them (the server).
        """
        profiles = distinct_profiles(requests)
        if batch is not None and len(batch.slots) != len(profiles):
            raise ValueError(f"{len(batch.slots)} slots for {len(profiles)} distinct profiles")
        slot = {id(p): u for u, p in enumerate(profiles)}
        inputs: list[TextInput] = []
        rows: list[int] = []
        for profile, texts in requests:
            inputs.extend(texts)
            rows.extend([slot[id(profile)]] * len(texts))
        if not inputs:
            return [[] for _ in requests]
        if batch is None:
            batch = self.transient_batch(profiles)
        logits, pooled = self.forward_rows(inputs, rows, profiles, batch, token_ids)
        # one softmax for the whole batch, each row over its own labels, and one copy to the host
        labels = torch.as_tensor([profiles[r].num_labels for r in rows]).to(logits.device)
        columns = torch.arange(logits.shape[1], device=logits.device)
        probs = torch.softmax(logits.masked_fill(columns >= labels[:, None], float("-inf")), dim=-1).tolist()
        answers: list[list[Prediction]] = []
        start = 0
        for profile, texts in requests:
            stop = start + len(texts)
            answer = [from_probs(profile, p) for p in probs[start:stop]]
            if profile.abstain is not None and answer:  # rows of profiles without a rule: as before
                rule = profile.abstain
                conf = rule.confidence(logits[start:stop, : profile.num_labels], pooled[start:stop]).tolist()
                answer = [a.with_confidence(profile, c) for a, c in zip(answer, conf, strict=True)]
            answers.append(answer)
            start = stop
        return answers

    def features(
        self, profile: Profile, inputs: Sequence[TextInput], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, C)`` logits and ``(n, d)`` pooled embeddings of one profile's rows, on the host:
        what an abstention rule reads (calibration and measurement use this)."""
        logits, pooled = [], []
        batch = self.transient_batch([profile])
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            out = self.forward_rows(chunk, [0] * len(chunk), [profile], batch)
            logits.append(out[0][:, : profile.num_labels].float().cpu())
            pooled.append(out[1].float().cpu())
        if not logits:
            return torch.zeros(0, profile.num_labels), torch.zeros(0, self.encoder.hidden_size)
        return torch.cat(logits), torch.cat(pooled)

    def transient_batch(self, profiles: Sequence[Profile]) -> SlotBatch:
        """A pool of exactly these profiles: fused in one call, heads built once, slot u = profile u.

        What a batch runs on when no long-lived pool holds its profiles: offline calls, and a
        served batch with more distinct profiles than the server's pool has free slots."""
        pool = SlotPool.wrap(self.fuse_batch(profiles))
        pool.write_heads(
            range(len(profiles)), [p.head_weight for p in profiles], [p.head_bias for p in profiles]
        )
        return SlotBatch(pool, list(range(len(profiles))))

    def predict(
        self, profile: Profile, inputs: Sequence[TextInput], batch_size: int = 64
    ) -> list[Prediction]:
        out: list[Prediction] = []
        for start in range(0, len(inputs), batch_size):
            out.extend(self.predict_batch([(profile, inputs[start : start + batch_size])])[0])
        return out
