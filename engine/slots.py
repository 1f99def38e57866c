"""The device slot pool: preallocated fused weights and heads, one slot per served profile.

The S-LoRA / vLLM way of serving many adapters: instead of one small tensor per profile that each
batch concatenates (and each fusion splits), the pool owns fixed tensors ``(L, S, ...)`` for the
adapters, allocated once, and each slot's head at its own label count within a byte budget
(:class:`SlotHeads`: the largest head any tenant uploads never sizes every slot's). A profile occupies one slot; a batch
passes each row's slot id, and the per-row adapter application (``layer.apply_adapters``, the
Triton SGMV kernel) indexes the pool directly. Cold profiles are fused straight into their slots.

Bookkeeping is LRU by slot, with pins: a batch pins every slot it reads from the moment it is
assembled until it ran, so neither an eviction (to make room for another cold profile) nor an
invalidation (a replaced or deleted profile) lets a slot be overwritten under it. A dropped slot
that is pinned is freed when its last pin goes. The pool itself is not thread-safe: the
``FusedCache`` that owns it (``engine/cache.py``) holds a lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence

import torch

from xpeft.adapters.fusion import FusedAdapters

# Resident heads of a pool, unless the caller gives another budget (the server: XPEFT_HEAD_CACHE_BYTES).
DEFAULT_HEAD_BYTES = 64 * 2**20


def head_nbytes(num_labels: int, hidden_size: int) -> int:
    """Bytes of one fp32 head ``(C, d)`` and its bias ``(C,)``."""
    return num_labels * (hidden_size + 1) * 4


def head_memory_bound(head_cache_bytes: int, max_batch_size: int, max_labels: int, hidden_size: int) -> int:
    """The most bytes classification heads take on the model's device, whatever tenants upload:
    the resident heads' budget, plus the heads of the one batch being run (its slots are pinned,
    so they stay even past the budget), plus that batch's padded gather ``(B, C, d)``."""
    one_batch = max_batch_size * head_nbytes(max_labels, hidden_size)
    return head_cache_bytes + 2 * one_batch


class SlotHeads:
    """Each slot's fp32 head at its own label count, not the largest any profile ever had: one
    tenant's 1,000-label profile costs its own 1.5 MB, not 1.5 MB times every slot. ``nbytes``
    counts what is resident; the pool keeps it within its budget by evicting idle slots."""

    def __init__(self, num_slots: int, hidden_size: int, device: torch.device) -> None:
        self.weights: list[torch.Tensor | None] = [None] * num_slots
        self.biases: list[torch.Tensor | None] = [None] * num_slots
        self.hidden_size = hidden_size
        self.device = device
        self.nbytes = 0

    def set(self, slot: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.clear(slot)
        self.weights[slot] = weight.to(self.device, torch.float32, non_blocking=True).clone()
        self.biases[slot] = bias.to(self.device, torch.float32, non_blocking=True).clone()
        self.nbytes += head_nbytes(weight.shape[0], self.hidden_size)

    def clear(self, slot: int) -> None:
        weight = self.weights[slot]
        if weight is not None:
            self.nbytes -= head_nbytes(weight.shape[0], self.hidden_size)
            self.weights[slot] = self.biases[slot] = None

    def gather(self, slots: Sequence[int], bias: bool) -> torch.Tensor:
        """``(B, C, d)`` heads (``bias``: ``(B, C)`` biases) of these slots, zero-padded to the most
        labels among them only (at least 2 columns; a slot without a head reads zeros)."""
        unique = sorted(set(slots))
        source = self.biases if bias else self.weights
        columns = max([2] + [t.shape[0] for s in unique if (t := source[s]) is not None])
        shape = (len(unique), columns) if bias else (len(unique), columns, self.hidden_size)
        stacked = torch.zeros(shape, device=self.device, dtype=torch.float32)
        for u, s in enumerate(unique):
            t = source[s]
            if t is not None:
                stacked[u, : t.shape[0]] = t
        position = {s: u for u, s in enumerate(unique)}
        return stacked[torch.as_tensor([position[s] for s in slots], device=self.device)]


class _HeadIndex:
    """``pool.heads[slots]`` / ``pool.head_bias[slots]``: the padded gather of :class:`SlotHeads`,
    indexed as the pool's former ``(S, C, d)`` tensor was (a slot tensor, a slot, or a tuple)."""

    def __init__(self, heads: SlotHeads, bias: bool) -> None:
        self._heads, self._bias = heads, bias

    def __getitem__(self, key: int | torch.Tensor | Sequence[int] | tuple) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(key, tuple):
            rest = key[1:]
            key = key[0]
        slots: list[int] = [key] if isinstance(key, int) else torch.as_tensor(key).reshape(-1).tolist()
        out = self._heads.gather(slots, self._bias)
        out = out[0] if isinstance(key, int) else out
        return out[rest] if rest else out


def slot_nbytes(num_layers: int, hidden_size: int, bottleneck: int, dtype: torch.dtype) -> int:
    """Bytes of one slot's adapter weights (the heads are counted apart: they grow with the labels)."""
    L, d, r = num_layers, hidden_size, bottleneck
    itemsize = torch.empty((), dtype=dtype).element_size()
    return L * (d * r + r + r * d + d) * itemsize


class SlotPool:
    """``num_slots`` preallocated adapter slots (and heads) on one device, with LRU and pins."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        hidden_size: int,
        bottleneck: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        head_bytes: int | None = DEFAULT_HEAD_BYTES,
    ) -> None:
        if num_slots < 1:
            raise ValueError("a slot pool needs at least one slot")
        L, S, d, r = num_layers, num_slots, hidden_size, bottleneck
        # empty, not zeros: a slot is always written before it is read, and untouched pages of a
        # large CPU pool then cost no memory until used
        weights = FusedAdapters(
            torch.empty(L, S, d, r, device=device, dtype=dtype),
            torch.empty(L, S, r, device=device, dtype=dtype),
            torch.empty(L, S, r, d, device=device, dtype=dtype),
            torch.empty(L, S, d, device=device, dtype=dtype),
        )
        self._setup(S, L, d, r, torch.device(device), dtype, weights, head_bytes)

    def _setup(
        self,
        S: int,
        L: int,
        d: int,
        r: int,
        device: torch.device,
        dtype: torch.dtype,
        weights: FusedAdapters,
        head_bytes: int | None,
    ) -> None:
        self.num_slots = S
        self.shape = (L, d, r)
        self.device = device
        self.dtype = dtype
        self.weights = weights
        # heads in fp32, as the runtime computes logits: per slot, at its own label count, within
        # head_bytes (None: unbounded, for a transient pool of one batch)
        self.slot_heads = SlotHeads(S, d, device)
        self.heads = _HeadIndex(self.slot_heads, bias=False)
        self.head_bias = _HeadIndex(self.slot_heads, bias=True)
        self.head_bytes = head_bytes
        self.head_evictions = 0  # idle slots dropped to keep the heads within head_bytes
        self.slot_bytes = slot_nbytes(L, d, r, dtype)
        self._slot_of: OrderedDict[Hashable, int] = OrderedDict()  # registered keys, LRU first
        self._key_of: dict[int, Hashable] = {}
        self._free = list(range(S - 1, -1, -1))  # a stack: slot 0 is handed out first
        self._pins: Counter[int] = Counter()
        self._doomed: set[int] = set()  # dropped while pinned: freed when the last pin goes
        self._headed: set[int] = set()  # slots whose head row holds their profile's head

    @classmethod
    def wrap(cls, weights: FusedAdapters) -> SlotPool:
        """A pool over already-fused ``(L, U, ...)`` weights, slot u = profile u (no copy)."""
        L, U, d, r = weights.down.shape
        pool = cls.__new__(cls)
        pool._setup(U, L, d, r, weights.down.device, weights.down.dtype, weights, None)
        return pool

    # -- bookkeeping -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot_of

    def registered(self) -> list[Hashable]:
        return list(self._slot_of)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    def find(self, key: Hashable) -> int | None:
        """The slot holding ``key`` (now the most recently used), or ``None``."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
        return slot

    def claim(self) -> tuple[int | None, list[Hashable]]:
        """A slot to write into, pinned, and the keys evicted to free it.

        Takes a free slot, else evicts the least recently used slot that no batch pins. ``None``
        when every slot is pinned (a batch with more distinct profiles than slots): that batch
        runs on a transient pool of its own (:meth:`wrap`).
        """
        evicted: list[Hashable] = []
        if not self._free:
            for key, slot in self._slot_of.items():
                if not self._pins[slot]:
                    self._unregister(key)
                    evicted.append(key)
                    break
        if not self._free:
            return None, evicted
        slot = self._free.pop()
        self._pins[slot] += 1
        return slot, evicted

    def commit(self, key: Hashable, slot: int) -> None:
        """Register a claimed, written slot under ``key`` (replacing any slot the key had)."""
        old = self._slot_of.get(key)
        if old is not None and old != slot:
            self._unregister(key)
        self._slot_of[key] = slot
        self._slot_of.move_to_end(key)
        self._key_of[slot] = key
        self._doomed.discard(slot)

    def pin(self, slot: int) -> None:
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] <= 0:
            del self._pins[slot]
            if slot in self._doomed or slot not in self._key_of:
                self._doomed.discard(slot)
                self.slot_heads.clear(slot)
                if slot not in self._free:
                    self._free.append(slot)

    def drop(self, key: Hashable) -> bool:
        """Forget ``key``; its slot is reused only once no batch pins it."""
        if key not in self._slot_of:
            return False
        self._unregister(key)
        return True

    def clear(self) -> None:
        for key in list(self._slot_of):
            self._unregister(key)

    def _unregister(self, key: Hashable) -> None:
        slot = self._slot_of.pop(key)
        del self._key_of[slot]
        if self._pins[slot]:
            self._doomed.add(slot)
        else:
            self._pins.pop(slot, None)
            self.slot_heads.clear(slot)
            self._free.append(slot)

    def headless(self, slots: Sequence[int]) -> list[int]:
        """Positions in ``slots`` whose head was never written (weights put without a profile)."""
        return [j for j, s in enumerate(slots) if s not in self._headed]

    # -- contents ----------------------------------------------------------------------------
    def view(self, slot: int) -> FusedAdapters:
        """Slot ``slot`` as a one-profile entry: a view into the pool, valid while the slot is held."""
        return FusedAdapters(*(t[:, slot : slot + 1] for t in self.weights.tensors()))

    def index(self, slots: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(slots), dtype=torch.long).to(self.device, non_blocking=True)

    def write(self, slots: Sequence[int] | torch.Tensor, fused: FusedAdapters) -> None:
        """Copy ``fused`` (``(L, U, ...)``, U = len(slots)) into the slots, one copy per tensor."""
        index = slots if isinstance(slots, torch.Tensor) else self.index(slots)
        for slot in index.tolist():
            self._headed.discard(slot)
            self.slot_heads.clear(slot)
        for pool_t, new in zip(self.weights.tensors(), fused.tensors(), strict=True):
            pool_t.index_copy_(1, index, new.to(pool_t.dtype))

    def zero(self, slots: Sequence[int]) -> None:
        index = self.index(slots)
        self._headed.difference_update(slots)
        for slot in slots:
            self.slot_heads.clear(slot)
        for pool_t in self.weights.tensors():
            pool_t.index_fill_(1, index, 0)

    def write_heads(
        self, slots: Sequence[int], weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
    ) -> None:
        """Each slot's head ``(C_u, d)`` and bias ``(C_u,)``, stored at its own size.

        Within ``head_bytes``: idle slots (registered, unpinned), least recently used first, are
        dropped until the new heads fit. The slots of the batch being run are pinned and always
        kept, so the resident heads stay below ``head_bytes`` plus one batch's own heads.
        """
        for slot in slots:
            self.slot_heads.clear(slot)
        needed = sum(head_nbytes(w.shape[0], self.slot_heads.hidden_size) for w in weights)
        if self.head_bytes is not None:
            writing = set(slots)
            for key, slot in list(self._slot_of.items()):
                if self.slot_heads.nbytes + needed <= self.head_bytes:
                    break
                if slot not in writing and not self._pins[slot] and self.slot_heads.weights[slot] is not None:
                    self._unregister(key)
                    self.head_evictions += 1
        for slot, w, b in zip(slots, weights, biases, strict=True):
            self.slot_heads.set(slot, w, b)
            self._headed.add(slot)
