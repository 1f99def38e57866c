"""The device slot pool: preallocated fused weights and heads, one slot per served profile.

The S-LoRA / vLLM way of serving many adapters: instead of one small tensor per profile that each
batch concatenates (and each fusion splits), the pool owns fixed tensors ``(L, S, ...)`` for the
adapters and ``(S, C, d)`` for the heads, allocated once. A profile occupies one slot; a batch
passes each row's slot id, and the per-row adapter application (``layer.apply_adapters``, the
Triton SGMV kernel) indexes the pool directly. Cold profiles are fused straight into their slots.

Bookkeeping is LRU by slot, with pins: a batch pins every slot it reads from the moment it is
assembled until it ran, so neither an eviction (to make room for another cold profile) nor an
invalidation (a replaced or deleted profile) lets a slot be overwritten under it. A dropped slot
that is pinned is freed when its last pin goes. The pool itself is not thread-safe: the server's
``FusedCache`` holds a lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence

import torch

from xpeft.adapters.fusion import FusedAdapters


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
        self._setup(S, L, d, r, torch.device(device), dtype, weights)

    def _setup(
        self, S: int, L: int, d: int, r: int, device: torch.device, dtype: torch.dtype, weights: FusedAdapters
    ) -> None:
        self.num_slots = S
        self.shape = (L, d, r)
        self.device = device
        self.dtype = dtype
        self.weights = weights
        # heads in fp32, as the runtime computes logits; columns grow with the most labels seen
        self.heads = torch.zeros(S, 2, d, device=device, dtype=torch.float32)
        self.head_bias = torch.zeros(S, 2, device=device, dtype=torch.float32)
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
        pool._setup(U, L, d, r, weights.down.device, weights.down.dtype, weights)
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
        when every slot is pinned (a batch with more distinct profiles than slots): the caller
        fuses that profile outside the pool.
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
        self._headed.difference_update(index.tolist())
        for pool_t, new in zip(self.weights.tensors(), fused.tensors(), strict=True):
            pool_t.index_copy_(1, index, new.to(pool_t.dtype))

    def zero(self, slots: Sequence[int]) -> None:
        index = self.index(slots)
        self._headed.difference_update(slots)
        for pool_t in self.weights.tensors():
            pool_t.index_fill_(1, index, 0)

    def write_heads(
        self, slots: Sequence[int], weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
    ) -> None:
        """Each slot's head ``(C_u, d)`` and bias ``(C_u,)``, padded with zeros to the pool's columns.

        Built on the host and copied in once; the columns grow (a reallocation) when a head has
        more labels than any before it.
        """
        if not slots:
            return
        c_max = max(w.shape[0] for w in weights)
        if c_max > self.heads.shape[1]:
            grown = torch.zeros(self.num_slots, c_max, self.heads.shape[2], device=self.device)
            grown_bias = torch.zeros(self.num_slots, c_max, device=self.device)
            grown[:, : self.heads.shape[1]] = self.heads
            grown_bias[:, : self.heads.shape[1]] = self.head_bias
            self.heads, self.head_bias = grown, grown_bias
        C = self.heads.shape[1]
        host = torch.zeros(len(slots), C, self.heads.shape[2])
        host_bias = torch.zeros(len(slots), C)
        for j, (w, b) in enumerate(zip(weights, biases, strict=True)):
            host[j, : w.shape[0]] = w
            host_bias[j, : b.shape[0]] = b
        index = self.index(slots)
        self._headed.update(slots)
        self.heads.index_copy_(0, index, host.to(self.device, non_blocking=True))
        self.head_bias.index_copy_(0, index, host_bias.to(self.device, non_blocking=True))
