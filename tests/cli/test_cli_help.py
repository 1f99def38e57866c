"""The ``xpeft`` parser: version, a fast help, descriptions and defaults, settings as flags, usage errors."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import inspect
import io
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from xpeft.cli import serve
from xpeft.cli.main import build_parser, main
from xpeft.cli.profiles import EVAL_BATCH_SIZE, TRAIN_FLAGS
from xpeft.server.settings import Settings
from xpeft.training.train_config import TrainConfig

HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "sklearn", "safetensors", "redis", "httpx")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def parsers(parser: argparse.ArgumentParser | None = None) -> Iterator[argparse.ArgumentParser]:
    """The parser and every subcommand's, depth first."""
    parser = parser or build_parser()
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_version_is_the_installed_distributions() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out.strip() == f"xpeft {importlib.metadata.version('xpeft')}"


def test_help_is_fast_and_loads_no_heavy_module() -> None:
    """`xpeft --help` must not import torch and co. (they take seconds); the time bound is lenient
    for a loaded CI machine (an idle one answers in about 0.25 s), the import check strict."""
    for argv in (["--help"], ["serve", "--help"], ["train", "--help"]):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "xpeft.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        seconds = time.perf_counter() - start
        assert proc.returncode == 0 and "usage: xpeft" in proc.stdout
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m.split(".")[0] in HEAVY}, argv
        assert seconds < 5, f"xpeft {' '.join(argv)} took {seconds:.2f} s"


def test_every_option_has_a_description_and_shows_its_default() -> None:
    for parser in parsers():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(
                action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction
            ):
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            assert action.help, f"{parser.prog} {name} has no description"
            shown = action.default is not None and action.default is not False and not action.required
            if shown and action.option_strings:
                assert f"default: {action.default}" in " ".join(text.split()), f"{parser.prog} {name}"


def test_train_defaults_are_train_config_defaults() -> None:
    args = build_parser().parse_args(["train", "--bank", "b", "--data", "d", "--out", "o"])
    defaults = TrainConfig()
    for name in TRAIN_FLAGS:
        assert getattr(args, name) == getattr(defaults, name), name
    assert set(TRAIN_FLAGS) <= set(TrainConfig.__dataclass_fields__)


def test_eval_and_bank_defaults_are_the_librarys() -> None:
    from xpeft.adapters.bank import create_random_bank
    from xpeft.training.evaluate import evaluate

    assert inspect.signature(evaluate).parameters["batch_size"].default == EVAL_BATCH_SIZE
    args = build_parser().parse_args(["bank", "create", "--out", "b.safetensors"])
    library = inspect.signature(create_random_bank).parameters
    assert args.n == library["num_adapters"].default
    for name in ("reduction_factor", "seed", "init_scale"):
        assert getattr(args, name) == library[name].default, name


def test_serve_has_a_flag_per_setting_and_none_for_secrets() -> None:
    parser = subparser("serve")
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    secrets = {
        n for n, f in Settings.model_fields.items() if SecretStr in getattr(f.annotation, "__args__", ())
    }
    assert {"admin_token", "api_token", "redis_password", "predict_tokens"} <= secrets
    assert dests == set(Settings.model_fields) - secrets
    assert dests >= {"admin_token_file", "api_token_file", "redis_password_file", "max_inputs", "access_log"}
    options = {o for a in parser._actions for o in a.option_strings}
    assert not {"--admin-token", "--api-token", "--redis-password", "--predict-tokens"} & options


def test_serve_flags_override_the_environment(monkeypatch, tmp_path) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"XPEFT_{name.upper()}", raising=False)
    monkeypatch.setenv("XPEFT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("XPEFT_ACCESS_LOG", "true")
    parser = build_parser()
    settings = serve.build_settings(parser.parse_args(["serve", "--bank", "b.safetensors"]))
    assert (settings.max_batch_size, settings.access_log, settings.port) == (8, True, 8000)
    argv = ["serve", "--bank", "b", "--max-batch-size", "16", "--no-access-log", "--max-wait-ms", "2.5"]
    argv += ["--log-level", "debug", "--sqlite-path", str(tmp_path / "s.db")]
    settings = serve.build_settings(parser.parse_args(argv))
    assert (settings.max_batch_size, settings.access_log, settings.max_wait_ms) == (16, False, 2.5)
    assert settings.log_level == "debug" and settings.sqlite_path == tmp_path / "s.db"
    token_file = tmp_path / "admin"
    token_file.write_text("a-token-read-from-a-file-0123\n")
    settings = serve.build_settings(
        parser.parse_args(["serve", "--bank", "b", "--admin-token-file", str(token_file)])
    )
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "a-token-read-from-a-file-0123"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-command"], "invalid choice"),
        (["train", "--bank", "b", "--data", "d"], "--out"),
        (["train", "--bank", "b", "--data", "d", "--out", "o", "--epochs", "three"], "invalid int value"),
        (["train", "--bank", "b", "--data", "d", "--out", "o", "--threads", "0"], "must be at least 1"),
        (["eval", "--bank", "b", "--profile", "p", "--data", "d", "--batch-size", "0"], "must be at least 1"),
        (["serve", "--port", "many"], "invalid int value"),
        (["serve", "--log-level", "loud"], "invalid choice"),
        (["serve", "--admin-token", "a-secret-on-the-command-line"], "unrecognized arguments"),
        (["bank", "create", "--out", "b", "--n", "0"], "must be at least 1"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, message) -> None:
    code, out, err = run(*argv)
    assert code == 2 and out == ""
    assert err.startswith("error: bad_argument: ") and message in err and err.count("\n") == 1, err
    assert "a-secret-on-the-command-line" not in err or "unrecognized" in err


def test_train_refuses_an_unwritable_output_before_loading_anything(tmp_path) -> None:
    # the bank does not exist either: the output is checked first, so the error names it
    for out, reason in ((tmp_path / "no" / "dir" / "p.xpm", "no folder"), (tmp_path, "is a folder")):
        code, _, err = run("train", "--bank", str(tmp_path / "missing.safetensors"), "--data", "d.tsv",
                           "--out", str(out), "--epochs", "1")  # fmt: skip
        assert code == 2 and err.startswith("error: bad_argument: ") and reason in err
    assert list(tmp_path.iterdir()) == []
