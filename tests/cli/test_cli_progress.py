"""Progress bars on a terminal only (never carriage returns in a log), and ``--threads``."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from xpeft.cli.main import main
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile
from xpeft.training.evaluate import evaluate
from xpeft.training.train import TrainConfig, train_profile


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def stderr_of(fn, stream: io.StringIO) -> str:
    with contextlib.redirect_stderr(stream):
        fn()
    return stream.getvalue()


@pytest.fixture(autouse=True)
def bars_allowed(monkeypatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def test_training_shows_a_bar_on_a_terminal_only(encoder, bank, separable) -> None:
    config = TrainConfig(method="hard", epochs=1, batch_size=32, max_length=16)
    train = lambda progress=True: train_profile(encoder, bank, separable, config, progress=progress)  # noqa: E731
    assert stderr_of(train, io.StringIO()) == ""  # a pipe or a log file: nothing, no \r
    shown = stderr_of(train, Terminal())
    assert "train hard" in shown and "\r" in shown
    assert stderr_of(lambda: train(progress=False), Terminal()) == ""


def test_evaluation_shows_a_bar_on_a_terminal_only(encoder, bank, separable) -> None:
    model = MultiProfileModel(encoder, bank)
    profile = random_profile(bank, "hard", seed=3, labels=["neg", "pos"])
    quiet = stderr_of(
        lambda: evaluate(model, profile, separable, batch_size=16, progress=True), io.StringIO()
    )
    assert quiet == ""
    results: list[dict] = []
    shown = stderr_of(
        lambda: results.append(evaluate(model, profile, separable, batch_size=16, progress=True)), Terminal()
    )
    assert "eval" in shown and f"{len(separable)}/{len(separable)}" in shown
    # chunking for the bar changes nothing: the same metrics as one call without it
    assert results[0] == evaluate(model, profile, separable, batch_size=64)


def test_threads_flag_sets_torch_threads(bank, separable, tmp_path) -> None:
    bank_path = bank.save(tmp_path / "bank.safetensors")
    profile_path = tmp_path / "p.xpm"
    xpm.save(random_profile(bank, "hard", seed=4, labels=["neg", "pos"]), profile_path)
    data = tmp_path / "dev.tsv"
    data.write_text(
        "sentence\tlabel\n"
        + "".join(f"{t}\t{y}\n" for t, y in zip(separable.inputs, separable.labels, strict=True))
    )
    before = torch.get_num_threads()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["eval", "--bank", str(bank_path), "--profile", str(profile_path), "--data", str(data),
                         "--threads", "1"])  # fmt: skip
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    metrics = json.loads(out.getvalue())
    assert metrics["n"] == len(separable) and set(metrics) == {"accuracy", "n", "f1", "mcc"}
