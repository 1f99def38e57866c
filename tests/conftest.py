"""Shared fixtures: the real MiniLM encoder and small seeded banks, loaded once per session."""

from __future__ import annotations

import os

# Tests never reach a model hub: a name that is not a local folder fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from xpeft.adapters.bank import AdapterBank, create_random_bank  # noqa: E402
from xpeft.adapters.encoder import AdapterEncoder, load_encoder  # noqa: E402
from xpeft.profiles.data import Dataset  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def encoder() -> AdapterEncoder:
    return load_encoder("minilm", device="cpu")


@pytest.fixture(scope="session")
def bank(encoder: AdapterEncoder) -> AdapterBank:
    """A small random bank (N=20) for the MiniLM: quick to fuse, same code as N=100."""
    return create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        num_adapters=20,
        seed=0,
        model_name="minilm",
    )


@pytest.fixture(scope="session")
def separable() -> Dataset:
    """A small, clearly separable sentiment set the tests write themselves."""
    good = ["wonderful", "excellent", "delightful", "brilliant", "lovely", "superb", "great", "charming"]
    bad = ["awful", "terrible", "dreadful", "horrible", "boring", "dismal", "lousy", "painful"]
    frames = ["the film was {}", "a {} experience", "what a {} meal", "this book is {}"]
    inputs, labels = [], []
    for frame in frames:
        for g, b in zip(good, bad, strict=True):
            inputs += [frame.format(g), frame.format(b)]
            labels += ["pos", "neg"]
    return Dataset(inputs, labels)
