"""The slot pool (LRU, pins, heads), fusion straight into slots, and the CUDA-graph bucketing on CPU."""

from __future__ import annotations

import pytest
import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.graphs import GraphRunner, batch_buckets, bucket_for, graphs_wanted, seq_buckets
from xpeft.engine.runtime import MultiProfileModel, SlotBatch
from xpeft.engine.slots import SlotPool, head_nbytes, slot_nbytes
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.synthetic import random_profile

TEXTS = ["a fine film", "dull and long, far too long for anyone", "bright", ("is it good?", "yes it is")]


def entry(value: float) -> FusedAdapters:
    fused = FusedAdapters.zeros(2, 8, 4)
    for t in fused.tensors():
        t.fill_(value)
    return fused


def test_pool_evicts_the_least_recent_unpinned_slot_only() -> None:
    pool = SlotPool(2, 2, 8, 4)
    assert pool.slot_bytes == slot_nbytes(2, 8, 4, torch.float32) == entry(0).nbytes
    a, _ = pool.claim()
    pool.write([a], entry(1))
    pool.commit("a", a)
    b, _ = pool.claim()
    pool.write([b], entry(2))
    pool.commit("b", b)
    pool.unpin(b)
    assert pool.free_slots == 0 and pool.pinned(a) and not pool.pinned(b)
    # "a" is older but pinned by a batch: "b" goes instead
    c, evicted = pool.claim()
    assert c == b and evicted == ["b"] and "a" in pool and "b" not in pool
    # everything pinned: no slot, nothing evicted, nothing overwritten
    slot, evicted = pool.claim()
    assert slot is None and evicted == [] and torch.equal(pool.view(a).down, entry(1).down)
    pool.unpin(a)
    pool.unpin(c)  # claimed but never committed: freed when its pin goes
    assert pool.free_slots == 1 and len(pool) == 1


def test_a_dropped_slot_is_not_reused_while_a_batch_holds_it() -> None:
    pool = SlotPool(1, 2, 8, 4)
    slot, _ = pool.claim()
    pool.write([slot], entry(7))
    pool.commit("old", slot)  # still pinned by the batch that fused it
    assert pool.drop("old") and "old" not in pool
    again, _ = pool.claim()
    assert again is None  # the batch still reads it: it cannot be handed out
    assert torch.equal(pool.view(slot).up_bias, entry(7).up_bias)
    pool.unpin(slot)
    assert pool.claim()[0] == slot  # free once the batch ran


def test_heads_are_stored_per_slot_at_their_own_size_and_tracked_per_slot() -> None:
    pool = SlotPool(3, 2, 8, 4)
    pool.write_heads([0], [torch.ones(2, 8)], [torch.ones(2)])
    pool.write_heads([2], [torch.full((5, 8), 2.0)], [torch.full((5,), 3.0)])
    # a 5-label head costs its own bytes, never 5 columns for every slot
    assert pool.slot_heads.nbytes == head_nbytes(2, 8) + head_nbytes(5, 8)
    assert pool.heads[torch.tensor([0, 2])].shape == (2, 5, 8)  # a batch pads to its own most labels
    assert pool.heads[0].shape == (2, 8)
    assert (
        torch.equal(pool.heads[0, :2], torch.ones(2, 8))
        and pool.heads[torch.tensor([0, 2])][0, 2:].abs().sum() == 0
    )
    assert torch.equal(pool.head_bias[2], torch.full((5,), 3.0))
    assert pool.headless([0, 1, 2]) == [1]
    pool.write([0], entry(1))  # new weights in a slot: its old head no longer belongs to it
    assert pool.headless([0, 1, 2]) == [0, 1]


def test_fusion_into_slots_equals_the_per_profile_fusion(encoder, bank) -> None:
    model = MultiProfileModel(encoder, bank)
    kinds = [ProfileKind.HARD, ProfileKind.SOFT, ProfileKind.SINGLE_ADAPTER, ProfileKind.HEAD_ONLY]
    profiles = [random_profile(bank, kind, seed=i) for i, kind in enumerate(kinds)]
    pool = SlotPool(6, bank.num_layers, bank.hidden_size, bank.bottleneck)
    slots = [5, 0, 3, 1]  # any order, not contiguous
    model.fuse_into_pool(pool, slots, profiles)
    for profile, slot in zip(profiles, slots, strict=True):
        alone = model.fuse_batch([profile])
        for got, want in zip(pool.view(slot).tensors(), alone.tensors(), strict=True):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(pool.heads[slot, : profile.num_labels], profile.head_weight.float())
    assert pool.view(1).down.abs().sum() == 0  # head-only: an adapter that adds nothing


def test_predictions_from_pool_slots_equal_a_transient_pool(encoder, bank) -> None:
    model = MultiProfileModel(encoder, bank)
    profiles = [random_profile(bank, seed=10 + i, labels=["a", "b", "c"][: 2 + i % 2]) for i in range(3)]
    requests = [(profiles[0], TEXTS[:2]), (profiles[1], TEXTS[2:]), (profiles[2], TEXTS[1:3])]
    pool = SlotPool(8, bank.num_layers, bank.hidden_size, bank.bottleneck)
    model.fuse_into_pool(pool, [7, 2, 4], profiles)
    from_pool = model.predict_batch(requests, SlotBatch(pool, [7, 2, 4]))
    transient = model.predict_batch(requests)
    for a, b in zip(from_pool, transient, strict=True):
        assert [x.label for x in a] == [x.label for x in b]
        assert [x.score for x in a] == pytest.approx([x.score for x in b], abs=1e-5)
    with pytest.raises(ValueError, match="3 distinct profiles"):
        model.predict_batch(requests, SlotBatch(pool, [7, 2]))


def test_buckets_and_the_setting() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64] and batch_buckets(5) == [1, 2, 4, 5]
    assert seq_buckets(512) == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert seq_buckets(100) == [16, 32, 48, 64, 96, 100] and seq_buckets(16) == [16]
    assert bucket_for(33, batch_buckets(64)) == 40 and bucket_for(65, batch_buckets(64)) is None
    assert not graphs_wanted(None, torch.device("cpu")) and not graphs_wanted(False, torch.device("cpu"))
    assert graphs_wanted(None, torch.device("cuda"))
    with pytest.raises(ValueError, match="cuda_graphs"):
        graphs_wanted(True, torch.device("cpu"))


def test_padded_static_buffers_change_no_answer(encoder, bank) -> None:
    """The graph path's padding and static buffers, run eagerly on CPU: same logits as unpadded."""
    model = MultiProfileModel(encoder, bank)
    profiles = [random_profile(bank, seed=20 + i) for i in range(3)]
    pool = SlotPool(4, bank.num_layers, bank.hidden_size, bank.bottleneck)
    model.fuse_into_pool(pool, [3, 1, 0], profiles)
    requests = [(profiles[0], TEXTS[:1]), (profiles[1], TEXTS[1:3]), (profiles[2], TEXTS)]
    plain = model.predict_batch(requests, SlotBatch(pool, [3, 1, 0]))
    runner = GraphRunner(encoder, pool.weights, max_batch=8, replay="eager")
    model.graphs = runner
    try:
        padded = model.predict_batch(requests, SlotBatch(pool, [3, 1, 0]))
        assert runner.stats()["buckets"] == 1
        (bucket,) = runner.buckets.values()
        assert (bucket.batch, bucket.seq) == (8, 16)  # 7 rows, at most 16 tokens
        assert bucket.rows[7:].tolist() == [0] and bucket.inputs["attention_mask"][7:].sum() == 0
        # a second, smaller batch reuses nothing stale from the first one's buffers
        alone = model.predict_batch([(profiles[1], TEXTS[2:3])], SlotBatch(pool, [1]))
        assert runner.stats()["buckets"] == 2
    finally:
        model.graphs = None
    for a, b in zip(plain, padded, strict=True):
        assert [x.label for x in a] == [x.label for x in b]
        assert [x.score for x in a] == pytest.approx([x.score for x in b], abs=1e-5)
    assert alone[0][0].score == pytest.approx(plain[1][1].score, abs=1e-5)
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(encoder, pool.weights, max_batch=8, replay="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager(bank) -> None:  # pragma: no cover - GPU machines only
    from xpeft.adapters.encoder import load_encoder

    model = MultiProfileModel(load_encoder("minilm", device="cuda"), bank)
    profiles = [random_profile(bank, seed=30 + i) for i in range(3)]
    pool = SlotPool(4, bank.num_layers, bank.hidden_size, bank.bottleneck, device="cuda")
    model.fuse_into_pool(pool, [0, 1, 2], profiles)
    requests = [(p, TEXTS) for p in profiles]
    eager = model.predict_batch(requests, SlotBatch(pool, [0, 1, 2]))
    model.graphs = GraphRunner(model.encoder, pool.weights, max_batch=16)
    replayed = [model.predict_batch(requests, SlotBatch(pool, [0, 1, 2])) for _ in range(2)]
    assert model.graphs.stats()["captured"] == 1 and model.graphs.stats()["replays"] == 2
    for again in replayed:
        for a, b in zip(eager, again, strict=True):
            assert [x.score for x in a] == pytest.approx([x.score for x in b], abs=1e-4)


def test_the_heads_stay_within_their_budget_by_evicting_idle_slots() -> None:
    budget = head_nbytes(1000, 8) + head_nbytes(2, 8) * 4
    pool = SlotPool(8, 2, 8, 4, head_bytes=budget)
    for n in range(6):  # six small profiles, registered and idle
        slot, _ = pool.claim()
        assert slot is not None
        pool.write_heads([slot], [torch.ones(2, 8)], [torch.ones(2)])
        pool.commit(f"small-{n}", slot)
        pool.unpin(slot)
    big, _ = pool.claim()
    assert big is not None
    pool.write_heads([big], [torch.ones(1000, 8)], [torch.ones(1000)])  # a maximal head
    assert pool.slot_heads.nbytes <= budget and pool.head_evictions >= 2
    assert "small-5" in pool and "small-0" not in pool  # least recently used first
    pool.commit("big", big)
    pool.unpin(big)
    slot, _ = pool.claim()
    assert slot is not None
    pool.write_heads([slot], [torch.ones(1000, 8)], [torch.ones(1000)])  # a second: the first goes
    assert pool.slot_heads.nbytes <= budget and "big" not in pool
