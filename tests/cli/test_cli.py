"""The CLI end to end, as a user runs it: JSON out, one-line errors and non-zero exits for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from xpeft.adapters.bank import AdapterBank
from xpeft.cli.main import main
from xpeft.profiles import format as xpm


def run(*args, check=True):
    """The CLI in this process (what `xpeft ARGS` runs): exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"xpeft {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, separable):
    work = tmp_path_factory.mktemp("cli")
    with open(work / "train.jsonl", "w") as f:
        for text, label in zip(separable.inputs, separable.labels, strict=True):
            f.write(json.dumps({"text": text, "y": label}) + "\n")
    run("bank", "create", "--out", str(work / "bank.safetensors"), "--n", "16", "--seed", "3")
    return work


def test_default_method_trains_a_units_profile(workdir):
    """No --method: the shipped default, a units profile, with its own flags."""
    common = ["--bank", str(workdir / "bank.safetensors"), "--data", str(workdir / "train.jsonl")]
    common += ["--text-col", "text", "--label-col", "y", "--epochs", "1", "--max-length", "16", "--quiet"]
    run("train", *common, "--out", str(workdir / "u.xpm"), "--k", "40", "--tied")
    info = json.loads(run("info", str(workdir / "u.xpm")).stdout)
    assert (info["kind"], info["k"], info["tied"], info["out_scale"], info["format_version"]) == (
        "units",
        40,
        True,
        False,
        3,
    )
    failed = run("train", *common, "--out", str(workdir / "v.xpm"), "--k", str(16 * 24 + 1), check=False)
    assert failed.returncode == 2 and "k=385" in failed.stderr and not (workdir / "v.xpm").exists()


def test_bank_train_info_eval_predict(workdir):
    bank = AdapterBank.load(workdir / "bank.safetensors")
    assert bank.num_adapters == 16 and bank.model_name == "minilm"
    out = run(
        "train",
        "--bank",
        str(workdir / "bank.safetensors"),
        "--data",
        str(workdir / "train.jsonl"),
        "--out",
        str(workdir / "p.xpm"),
        "--method",
        "hard",
        "--k",
        "4",
        "--text-col",
        "text",
        "--label-col",
        "y",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--quiet",
    )
    summary = json.loads(out.stdout)
    assert summary["bytes"] == (workdir / "p.xpm").stat().st_size
    info = json.loads(run("info", str(workdir / "p.xpm")).stdout)
    for key in ("format_version", "kind", "bytes", "num_layers", "num_adapters", "k", "bank_id", "labels"):
        assert key in info
    assert (info["kind"], info["k"], info["num_adapters"], info["bank_id"]) == ("hard", 4, 16, bank.bank_id)
    parts = info["bytes_by_part"]  # what the file's bytes are spent on: the parts add up to it
    assert parts["total"] == info["bytes"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["head"] == 2 * (len(info["labels"]) * info["hidden_size"] + len(info["labels"]))
    assert info["labels"] == ["neg", "pos"]
    metrics = json.loads(
        run(
            "eval",
            "--bank",
            str(workdir / "bank.safetensors"),
            "--profile",
            str(workdir / "p.xpm"),
            "--data",
            str(workdir / "train.jsonl"),
            "--text-col",
            "text",
            "--label-col",
            "y",
        ).stdout
    )
    assert metrics["n"] == 64 and metrics["accuracy"] >= 0.9 and "mcc" in metrics and "f1" in metrics
    preds = json.loads(
        run(
            "predict",
            "--bank",
            str(workdir / "bank.safetensors"),
            "--profile",
            str(workdir / "p.xpm"),
            "what a superb film",
            "a dreadful meal",
        ).stdout
    )
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert abs(sum(preds[0]["scores"].values()) - 1) < 1e-5


def _assert_user_error(proc, code):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {code}:"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_files_exit_non_zero_with_a_message(workdir):
    good = (workdir / "p.xpm").read_bytes() if (workdir / "p.xpm").exists() else None
    if good is None:
        pytest.skip("needs the profile from the end-to-end test")
    (workdir / "short.xpm").write_bytes(good[:50])
    _assert_user_error(run("info", str(workdir / "short.xpm"), check=False), "truncated")
    # the same through a real process: exit status 2 and one line, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "xpeft.cli", "info", str(workdir / "short.xpm")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    _assert_user_error(proc, "truncated")
    assert len(proc.stderr.strip().splitlines()) == 1
    flipped = bytearray(good)
    flipped[-20] ^= 1
    (workdir / "flip.xpm").write_bytes(bytes(flipped))
    _assert_user_error(run("info", str(workdir / "flip.xpm"), check=False), "checksum_mismatch")
    (workdir / "foreign.xpm").write_bytes(b"\x7fELF" + bytes(200))
    _assert_user_error(run("info", str(workdir / "foreign.xpm"), check=False), "bad_magic")
    _assert_user_error(run("info", str(workdir / "nope.xpm"), check=False), "not_found")
    # a profile for another bank
    run("bank", "create", "--out", str(workdir / "other.safetensors"), "--n", "16", "--seed", "4")
    proc = run(
        "eval",
        "--bank",
        str(workdir / "other.safetensors"),
        "--profile",
        str(workdir / "p.xpm"),
        "--data",
        str(workdir / "train.jsonl"),
        "--text-col",
        "text",
        "--label-col",
        "y",
        check=False,
    )
    _assert_user_error(proc, "bank_mismatch")
    proc = run(
        "train",
        "--bank",
        str(workdir / "bank.safetensors"),
        "--data",
        str(workdir / "train.jsonl"),
        "--out",
        str(workdir / "x.xpm"),
        "--quiet",
        check=False,
    )  # default column "sentence" is absent
    _assert_user_error(proc, "bad_data")
    assert not (workdir / "x.xpm").exists()


def test_single_adapters_stack_into_a_bank(workdir):
    paths = []
    for seed in (1, 2):
        path = workdir / f"adapter{seed}.xpm"
        run(
            "train",
            "--bank",
            str(workdir / "bank.safetensors"),
            "--data",
            str(workdir / "train.jsonl"),
            "--out",
            str(path),
            "--method",
            "single_adapter",
            "--text-col",
            "text",
            "--label-col",
            "y",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--max-length",
            "16",
            "--seed",
            str(seed),
            "--quiet",
        )
        paths.append(path)
    run("bank", "from-adapters", "--out", str(workdir / "trained.safetensors"), *map(str, paths))
    trained = AdapterBank.load(workdir / "trained.safetensors")
    assert trained.num_adapters == 2 and trained.init == "trained" and trained.model_name == "minilm"
    for i, path in enumerate(paths):
        adapter = xpm.load(path).adapter
        for name, tensor in adapter.items():
            assert torch.equal(getattr(trained, name)[:, i], tensor)
    proc = run(
        "bank",
        "from-adapters",
        "--out",
        str(workdir / "bad.safetensors"),
        str(workdir / "p.xpm"),
        check=False,
    )
    _assert_user_error(proc, "bad_argument")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--method", "head_only", "--k", "5"], "k applies to hard and units only"),
        (["--method", "single_adapter", "--no-gain"], "gain applies to hard only"),
        (["--method", "hard", "--lr-adapter", "0.01"], "lr_adapter applies to single_adapter only"),
        (["--scale-power", "9"], "scale_power must lie in [0, 4]"),
        (["--lr", "nan"], "lr_scores must be a finite number"),
    ],
)
def test_train_refuses_bad_or_inapplicable_flags_before_writing(workdir, flags, message):
    out = workdir / "refused.xpm"
    # the bank need not even exist: settings are checked before anything is loaded
    proc = run("train", "--bank", str(workdir / "missing.safetensors"), "--data", "x.tsv", "--out", str(out),
               *flags, check=False)  # fmt: skip
    _assert_user_error(proc, "bad_argument")
    assert message in proc.stderr and not out.exists()
