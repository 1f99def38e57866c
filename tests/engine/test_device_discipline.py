"""Device discipline: the whole serving path with the model on a GPU's stand-in, where any host
tensor that meets a device tensor fails the test as it would fail a batch on a GPU.

The stand-in (tests/engine/stand_in_device.py) gives tensors whose ``device`` is ``cuda`` and
which carry CPU values, on a CPU-only torch. ``FakeTensorMode`` or the ``meta`` device would
give tensors without values, and the serving path reads values on the host on purpose (slot ids,
a profile's masks, the answer's probabilities): under them it stops at the first such read. Here
every ATen op first checks CUDA's one-device rule (a 0-dim host tensor as a scalar, host indices
in advanced indexing and copies across devices are allowed, as on a GPU), then runs on the CPU
values; so the answers can also be compared with the CPU reference. That comparison is a
by-product: the values a GPU computes in bf16 or with the Triton kernels are the GPU run's to
check (bench/gpu_check.py). CUDA graphs cannot be captured here: the graph runner runs with
``replay="eager"`` (its static buffers and bucketing on the device, no capture).

What runs: the server's batch step (``ModelWorker.run``: the fused-weight cache's reservation,
cold profiles fused into their device slots, heads per slot, ``predict_batch``, the abstention
rule), for every profile kind, with no rule and with each rule score, cold and warm (and a
request's ``min_confidence`` on their answers), the gather and the GEMM fusion of hard profiles,
heads of different label counts, a pool too small for the batch (profiles fused outside it), the
graph runner, the offline API, and fitting a rule on the device model (what the training service
does after training, before it stores the profile).
"""

from __future__ import annotations

import pytest
import torch
from stand_in_device import DeviceMixError, StandInDevice

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder, load_encoder
from xpeft.engine.batcher import Job
from xpeft.engine.cache import CachedProfile, FusedCache, VersionFloors
from xpeft.engine.graphs import GraphRunner
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.profiles.kinds import KINDS, ProfileKind
from xpeft.profiles.profile import Profile
from xpeft.profiles.synthetic import random_profile, random_rule
from xpeft.training.abstain_fit import fit_rule, split_for_rule
from xpeft.training.data import Dataset
from xpeft.training.train_config import ABSTAIN_SCORES

TEXTS = ["the film was wonderful", "a dreadful meal", ("is it open", "the shop opens at nine"), "hi"]
RULES = [None, *ABSTAIN_SCORES]


@pytest.fixture(scope="module")
def device_model(bank: AdapterBank) -> MultiProfileModel:
    """The MiniLM and the test bank on the stand-in device, loaded as a server loads them."""
    with StandInDevice(), torch.no_grad():
        model = MultiProfileModel(load_encoder("minilm", device="cuda"), bank)
    return model


@pytest.fixture(scope="module")
def host_model(encoder: AdapterEncoder, bank: AdapterBank) -> MultiProfileModel:
    return MultiProfileModel(encoder, bank)


@pytest.fixture(autouse=True)
def stand_in():
    """Every test body runs with the stand-in active (factories and moves towards ``cuda``)."""
    with StandInDevice(), torch.no_grad():
        yield


def with_rule(profile: Profile, score: str | None, seed: int) -> Profile:
    if score is not None:
        profile.abstain = random_rule(
            profile.num_labels, seed=seed, score=score, hidden_size=profile.hidden_size, min_confidence=0.3
        )
    return profile


def every_kind(bank: AdapterBank, score: str | None, seed: int = 0) -> list[Profile]:
    """One profile of each kind, each with its own label count (2 to 6), all with ``score``'s rule."""
    profiles = []
    for i, kind in enumerate(KINDS):
        labels = [f"{kind.value}-{j}" for j in range(2 + i)]
        profile = random_profile(
            bank, kind, seed=seed + i, labels=labels, k=2 if kind is ProfileKind.HARD else None
        )
        profiles.append(with_rule(profile, score, seed + i))
    return profiles


def as_served(profiles: list[Profile], bank: AdapterBank) -> list[Profile]:
    """Each profile as a server holds it: encoded to ``.xpm`` and decoded on the host."""
    return [xpm.decode(xpm.encode(p), bank) for p in profiles]


def worker_for(model: MultiProfileModel, slots: int = 16) -> ModelWorker:
    from xpeft.engine.slots import slot_nbytes

    bank, enc = model.bank, model.encoder
    size = slot_nbytes(bank.num_layers, bank.hidden_size, bank.bottleneck, enc.dtype)
    worker = ModelWorker(FusedCache(slots * size, VersionFloors()))
    worker.executor.shutdown()  # the batch runs on this thread, where the stand-in is active
    worker.tokenizer.shutdown()
    worker.attach(model, cuda_graphs=False, max_batch=32)
    return worker


def jobs_for(profiles: list[Profile], model: MultiProfileModel | None = None) -> list[Job]:
    """One job per profile over :data:`TEXTS` (rotated); tokenized ahead as the server does when
    ``model`` is given."""
    jobs = []
    for u, p in enumerate(profiles):
        texts = TEXTS[u % len(TEXTS) :] + TEXTS[: u % len(TEXTS)]
        job = Job(CachedProfile(f"p{u}", 1, p), texts[: 1 + u % 3], None)  # type: ignore[arg-type]
        if model is not None:
            job.token_ids = model.encoder.token_ids(job.inputs, p.max_length)
        jobs.append(job)
    return jobs


def assert_same_answers(got: list, want: list, rules: bool) -> None:
    """The device answers are the host reference's: labels, label probabilities, confidences."""
    assert [len(a) for a in got] == [len(a) for a in want]
    for a_row, b_row in zip(got, want, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            assert (a.label, a.abstained) == (b.label, b.abstained)
            assert a.scores == pytest.approx(b.scores, abs=1e-4)
            if rules:
                assert a.confidence is not None and a.confidence == pytest.approx(b.confidence, abs=1e-4)
            else:
                assert a.confidence is None and b.confidence is None


def on_device(model: MultiProfileModel) -> None:
    """The stand-in really holds the model: a guard against a test that silently runs on the host."""
    assert model.encoder.device.type == "cuda" and model.device_bank.down.device.type == "cuda"


# -- the stand-in itself --------------------------------------------------------------------
def test_the_stand_in_refuses_what_a_gpu_refuses():
    knots = torch.linspace(0, 1, 16)
    scores = torch.rand(4, device="cuda")
    assert scores.device.type == "cuda"
    with pytest.raises(DeviceMixError, match="searchsorted"):
        torch.searchsorted(knots, scores)
    with pytest.raises(DeviceMixError, match="mm"):
        torch.randn(4, 3, device="cuda") @ torch.randn(3, 2)
    with pytest.raises(DeviceMixError, match="indexed with device indices"):
        knots[torch.tensor([0, 1], device="cuda")]
    # what a GPU accepts: host scalars, host indices, copies across devices
    assert (scores * torch.tensor(2.0)).device.type == "cuda"
    assert scores[torch.tensor([0, 2])].shape == (2,)
    scores[1:3] = torch.ones(2)
    assert scores.tolist()[1:3] == [1.0, 1.0] and scores.cpu().device.type == "cpu"


# -- the server's batch step ----------------------------------------------------------------
@pytest.mark.parametrize("score", RULES)
def test_every_kind_with_each_rule_cold_then_warm(device_model, host_model, bank, score):
    """One mixed batch of every kind (2 to 6 labels each), each profile with ``score``'s rule: the
    server's batch step on the device, cold (fused into empty slots) and then warm (slots hit)."""
    on_device(device_model)
    profiles = as_served(every_kind(bank, score), bank)
    worker = worker_for(device_model)
    want = host_model.predict_batch([(j.entry.profile, j.inputs) for j in jobs_for(profiles)])
    cold = worker.run(jobs_for(profiles))
    assert worker.fused_cache.pool is not None and worker.fused_cache.pool.device.type == "cuda"
    assert len(worker.fused_cache) == len(profiles)
    warm = worker.run(jobs_for(profiles, device_model))  # tokenized ahead, as the server does
    assert_same_answers(cold, want, score is not None)
    assert_same_answers(warm, want, score is not None)
    if score is not None:  # a request's own operating point, applied to the device's answers
        for profile, answer in zip(profiles, warm, strict=True):
            assert not any(a.at_operating_point(profile, 0.0).abstained for a in answer)
            strict = [a.at_operating_point(profile, 1.0) for a in answer]
            assert [a.abstained for a in strict] == [a.confidence < 1.0 for a in answer]


@pytest.mark.parametrize("hard_profiles", [2, 12])
def test_hard_profiles_by_gather_and_by_gemm(device_model, host_model, bank, hard_profiles):
    """Past N selected adapters in all (on a GPU), hard profiles fuse by the GEMM over the bank
    instead of the gather; a soft profile in the batch joins the GEMM either way."""
    k = 2
    gathers = device_model._gathers(hard_profiles * k)
    assert gathers == (hard_profiles * k <= bank.num_adapters)
    hard = [
        with_rule(random_profile(bank, "hard", seed=40 + i, k=k), "cosine", i) for i in range(hard_profiles)
    ]
    profiles = as_served([*hard, with_rule(random_profile(bank, "soft", seed=39), "energy", 39)], bank)
    want = host_model.predict_batch([(j.entry.profile, j.inputs) for j in jobs_for(profiles)])
    worker = worker_for(device_model)
    assert_same_answers(worker.run(jobs_for(profiles)), want, True)
    assert_same_answers(worker.run(jobs_for(profiles)), want, True)


def test_more_profiles_than_slots_fuse_outside_the_pool(device_model, host_model, bank):
    """A batch with more distinct profiles than the pool has slots: the rest are fused for this
    batch only, and their heads built per batch (the runtime's other path)."""
    profiles = as_served(every_kind(bank, "cosine", seed=60), bank)
    worker = worker_for(device_model, slots=2)
    want = host_model.predict_batch([(j.entry.profile, j.inputs) for j in jobs_for(profiles)])
    assert_same_answers(worker.run(jobs_for(profiles)), want, True)
    assert worker.fused_cache.num_slots == 2


def test_graph_runner_buffers_on_the_device(device_model, host_model, bank):
    """The CUDA graph runner's padding and static buffers on the device (replayed eagerly here)."""
    profiles = as_served(every_kind(bank, "msp", seed=80), bank)
    worker = worker_for(device_model)
    assert worker.fused_cache.pool is not None
    device_model.graphs = GraphRunner(
        device_model.encoder, worker.fused_cache.pool.weights, 32, replay="eager"
    )
    try:
        want = host_model.predict_batch([(j.entry.profile, j.inputs) for j in jobs_for(profiles)])
        assert_same_answers(worker.run(jobs_for(profiles, device_model)), want, True)
        assert device_model.graphs.stats()["buckets"] >= 1  # the batch ran through a bucket
    finally:
        device_model.graphs = None


# -- the offline API and the training service's rule fitting ---------------------------------
def test_offline_predict_logits_and_fused_entries(device_model, host_model, bank):
    profiles = as_served(every_kind(bank, "max_logit", seed=100), bank)
    for p in profiles:
        assert_same_answers([device_model.predict(p, TEXTS)], [host_model.predict(p, TEXTS)], True)
    rows = [0, 1, 2, 3]
    batch = device_model.transient_batch(profiles[:4])  # what an offline call or an overflow runs on
    logits, pooled = device_model.forward_rows(TEXTS, rows, profiles[:4], batch)
    assert logits.device.type == "cuda" and pooled.device.type == "cuda"
    want, _ = host_model.forward_rows(TEXTS, rows, profiles[:4], host_model.transient_batch(profiles[:4]))
    assert torch.allclose(logits.cpu(), want, atol=1e-4)


@pytest.mark.parametrize("score", ["msp", "cosine"])  # logits only; and pooled rows with class means
def test_a_rule_fitted_on_the_device_model_serves(device_model, host_model, bank, separable: Dataset, score):
    """What the training service does once a profile is trained: fit its rule with the model on
    the device (held-out rows scored by the runtime), store it, and serve it. (Training itself is
    not run here: autograd's backward needs a per-device thread a CPU-only build lacks.)"""
    profile = random_profile(bank, "units", seed=7, labels=sorted(set(separable.labels)))
    split = split_for_rule(separable, 0.3, seed=0)
    rule = fit_rule(device_model, profile, split, score)
    assert rule.knots.device.type == "cpu"  # what the file stores is read on the host
    assert rule.class_means is None or rule.class_means.device.type == "cpu"
    host_rule = fit_rule(host_model, profile, split, score)
    assert torch.allclose(rule.knots, host_rule.knots, atol=1e-2)
    profile.abstain = rule
    served = xpm.decode(xpm.encode(profile), bank)
    answers = worker_for(device_model).run(jobs_for([served]))
    want = host_model.predict_batch([(j.entry.profile, j.inputs) for j in jobs_for([served])])
    assert_same_answers(answers, want, True)
