"""What the runtime promises its callers: the slots passed in are read as given, profiles are
only read, lengths are kept within the encoder, one rule picks a bank's encoder, the kernel choice
is read once as the model is built, and the ``xpeft`` command starts without loading torch."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from xpeft.adapters import encoder as encoder_module
from xpeft.adapters import kernels
from xpeft.adapters.encoder import MIN_TOKENS, encoder_for_bank
from xpeft.adapters.kernels import KernelChoice
from xpeft.engine.runtime import MultiProfileModel, SlotBatch, distinct_profiles
from xpeft.engine.slots import SlotPool
from xpeft.profiles.profile import ProfileKind
from xpeft.profiles.synthetic import random_profile

LONG = " ".join(["word"] * 800)  # far beyond MiniLM's 512 positions


def test_predict_batch_reads_the_slots_it_is_given(encoder, bank) -> None:
    model = MultiProfileModel(encoder, bank)
    p, q = random_profile(bank, seed=1), random_profile(bank, ProfileKind.SOFT, seed=2)
    requests = [(p, ["a fine film"]), (q, ["dull", "bright"]), (p, ["again"])]
    assert distinct_profiles(requests) == [p, q]
    expected = model.predict_batch(requests)
    pool = SlotPool(5, bank.num_layers, bank.hidden_size, bank.bottleneck)
    model.fuse_into_pool(pool, [4, 1], [p, q])
    model.fuse_batch = lambda profiles: pytest.fail("predict_batch fused although slots were given")  # type: ignore[method-assign]
    given = model.predict_batch(requests, SlotBatch(pool, [4, 1]))
    assert [[x.label for x in a] for a in given] == [[x.label for x in a] for a in expected]
    for got, want in zip(given, expected, strict=True):
        assert [x.score for x in got] == pytest.approx([x.score for x in want], abs=1e-6)
    # swapped slots must change the answer, so the slots given are the ones read
    swapped = model.predict_batch(requests, SlotBatch(pool, [1, 4]))
    assert any(a.score != pytest.approx(b.score, abs=1e-6) for a, b in zip(swapped[1], given[1], strict=True))
    with pytest.raises(ValueError, match="2 distinct profiles"):
        model.predict_batch(requests, SlotBatch(pool, [4]))


def test_profiles_are_not_changed_and_any_declared_length_predicts(encoder, bank) -> None:
    model = MultiProfileModel(encoder, bank)
    long_one = random_profile(bank, seed=3, max_length=65536)
    short_one = random_profile(bank, seed=4, max_length=1)
    answers = model.predict_batch([(long_one, [LONG, (LONG, LONG)]), (short_one, ["x", ("a", "b")])])
    assert [len(a) for a in answers] == [2, 2]
    assert (long_one.max_length, short_one.max_length) == (65536, 1)  # read, never rewritten
    assert encoder.usable_length(65536) == encoder.max_tokens == 512
    assert encoder.usable_length(1) == MIN_TOKENS
    assert encoder.tokenize([LONG], 65536)["input_ids"].shape[1] == 512


def test_encoder_for_bank_prefers_the_named_model_then_the_banks_own(monkeypatch) -> None:
    chosen = []
    monkeypatch.setattr(
        encoder_module, "load_encoder", lambda name, device, dtype, revision: chosen.append((name, revision))
    )
    pinned = SimpleNamespace(model_name="random:bert-base", model_revision="abc123")
    encoder_for_bank(pinned, "minilm")  # type: ignore[arg-type]
    encoder_for_bank(pinned)  # type: ignore[arg-type]
    encoder_for_bank(SimpleNamespace(model_name="", model_revision=""))  # type: ignore[arg-type]
    # a named model is loaded as named; the bank's own model with the revision the bank pinned
    assert chosen == [("minilm", None), ("random:bert-base", "abc123"), (encoder_module.DEFAULT_MODEL, None)]


def test_the_kernel_choice_is_read_once_when_the_model_is_built(monkeypatch, encoder, bank) -> None:
    fake_cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, requires_grad=False)
    monkeypatch.setattr(kernels, "HAVE_TRITON", True)
    monkeypatch.setenv("XPEFT_KERNELS", "off")
    model = MultiProfileModel(encoder, bank)
    assert not model.kernels.enabled("apply", fake_cuda)
    monkeypatch.setenv("XPEFT_KERNELS", "all")  # too late: the model has read it
    assert not model.kernels.enabled("apply", fake_cuda)
    assert encoder.slots[0].kernels is model.kernels  # the one choice, down to every adapter slot
    given = MultiProfileModel(encoder, bank, KernelChoice.parse("apply"))
    assert given.kernels.enabled("apply", fake_cuda) and encoder.slots[0].kernels is given.kernels
    with encoder.kernels_switched(apply=False):
        assert not encoder.slots[-1].kernels.enabled("apply", fake_cuda)  # type: ignore[union-attr]
    assert encoder.slots[-1].kernels is given.kernels
    encoder.kernels = None  # the shared fixture goes back to the torch path


def test_the_command_starts_without_torch() -> None:
    code = (
        "import sys; from xpeft.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
