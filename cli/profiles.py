"""``xpeft train | eval | info | predict``: profiles offline, on the local encoder.

``predict --url`` goes to a server instead (:mod:`xpeft.cli.remote`), with the same output.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli import jobs
from xpeft.cli.output import parse_inputs, positive_int, print_json, writable_target
from xpeft.cli.remote import TOKEN_HELP
from xpeft.training.train_config import (
    ABSTAIN_FIELDS,
    ABSTAIN_SCORES,
    DEFAULT_ABSTAIN_RATE,
    ESTIMATORS,
    HEAD_INITS,
    METHODS,
    SCORE_OPTIMIZERS,
    TrainConfig,
)

# TrainConfig fields that `xpeft train` sets from flags of the same name
TRAIN_FLAGS = (
    "method",
    "k",
    "epochs",
    "lr_scores",
    "lr_head",
    "lr_adapter",
    "temperature",
    "scale_power",
    "gain",
    "gain_init",
    "weighted",
    "lr_gain",
    "estimator",
    "tied",
    "out_scale",
    "lr_out_scale",
    "head_init",
    "score_optimizer",
    "batch_size",
    "max_length",
    "seed",
    *ABSTAIN_FIELDS,
)

EVAL_BATCH_SIZE = 64  # xpeft.training.evaluate.evaluate's default (a test checks they agree)

if TYPE_CHECKING:
    from xpeft.engine.runtime import MultiProfileModel
    from xpeft.training.data import Dataset


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-col", default="sentence", help="column (or JSON key) of the text")
    p.add_argument("--text-pair-col", default=None, help="column of a pair's second text, for pair tasks")
    p.add_argument("--label-col", default="label", help="column of the label")


def _switch(p: argparse.ArgumentParser, flag: str, default: bool, help: str) -> None:
    """A training switch with its ``--no-`` form."""
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice; one is often faster on a busy machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (bars only show on a terminal)")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


# Offline texts are only bounded by memory; a label must fit the .xpm header's 256 characters.
_CLI_MAX_TEXT_CHARS = 2**20
_CLI_MAX_LABEL_CHARS = 256


def _load_data(path: str, args: argparse.Namespace) -> Dataset:
    """The file, every text and label checked by the same rule the server applies."""
    from xpeft.training.data import check_dataset, load_dataset

    data = load_dataset(path, args.text_col, args.text_pair_col, args.label_col)
    check_dataset(data, _CLI_MAX_TEXT_CHARS, _CLI_MAX_LABEL_CHARS)
    return data


def _model(args: argparse.Namespace) -> MultiProfileModel:
    """``--bank`` with ``--model`` (default: the encoder the bank was built for)."""
    from xpeft.engine.runtime import MultiProfileModel

    return MultiProfileModel.load(args.bank, args.model)


def cmd_train(args: argparse.Namespace) -> None:
    """Train one profile and write its ``.xpm`` file; prints a JSON summary. With ``--url``, a
    server trains and stores it instead (:mod:`xpeft.cli.jobs`)."""
    if args.url:
        jobs.train_remote(args, TRAIN_FLAGS)
        return
    if not (args.bank and args.out):
        raise XPeftError("bad_argument", "train needs --bank and --out (offline), or --url and --id (server)")
    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.encoder import encoder_for_bank
    from xpeft.profiles import format as xpm
    from xpeft.training.train import train_profile

    config = TrainConfig(**{name: getattr(args, name) for name in TRAIN_FLAGS})
    config.validate()  # before anything is loaded, trained or written
    writable_target(Path(args.out), force=True)
    _set_threads(args)
    bank = AdapterBank.load(args.bank)
    encoder = encoder_for_bank(bank, args.model)
    train = _load_data(args.data, args)
    eval_data = _load_data(args.eval_data, args) if args.eval_data else None
    result = train_profile(encoder, bank, train, config, eval_data=eval_data, progress=not args.quiet)
    result.profile.meta["model_name"] = args.model or bank.model_name
    size = xpm.save(result.profile, args.out)
    summary = {
        "out": str(args.out),
        "method": args.method,
        "bytes": size,
        "seconds": round(result.seconds, 2),
        "final_loss": result.history[-1]["loss"],
        "train_accuracy": result.history[-1]["train_accuracy"],
    }
    if eval_data is not None:
        summary["eval_accuracy"] = result.history[-1].get("eval_accuracy")
    rule = result.profile.abstain
    summary["abstain"] = rule.summary() if rule is not None else None
    if result.notes:
        summary["notes"] = result.notes
    print_json(summary)


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy, F1 and Matthews correlation of a profile on labelled data."""
    from xpeft.training.evaluate import evaluate

    _set_threads(args)
    model = _model(args)
    profile = model.load_profile(args.profile)
    data = _load_data(args.data, args)
    print_json(evaluate(model, profile, data, batch_size=args.batch_size, progress=not args.quiet))


def cmd_info(args: argparse.Namespace) -> None:
    """A profile file's header and size, without a bank or an encoder."""
    from xpeft.profiles import format as xpm

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise XPeftError("not_found", f"cannot read {args.file}: {exc.strerror}") from exc
    from xpeft.profiles.format_sizes import size_parts

    info = xpm.read_info(data).as_dict()
    rule = xpm.decode(data).abstain if info["abstain"] else None
    print_json({**info, "bytes_by_part": size_parts(data), "rule": rule.summary() if rule else None})


def cmd_predict(args: argparse.Namespace) -> None:
    """Labels and scores per text, offline or (``--url``) from a server."""
    if args.url:
        from xpeft.cli.remote import predict_remote

        predict_remote(args)
        return
    if not (args.bank and args.profile):
        raise XPeftError(
            "bad_argument", "predict needs --bank and --profile (offline) or --url and --id (server)"
        )
    model = _model(args)
    profile = model.load_profile(args.profile)
    predictions = model.predict(profile, parse_inputs(args.texts, args.pair_sep))
    if args.min_confidence is not None:
        predictions = [p.at_operating_point(profile, args.min_confidence) for p in predictions]
    print_json([{"input": t, **p.as_dict()} for t, p in zip(args.texts, predictions, strict=True)])


def register(subparsers: Any) -> None:
    """Add ``train``, ``eval``, ``info`` and ``predict`` to the ``xpeft`` command."""
    p = subparsers.add_parser("train", help="train a profile")
    p.add_argument("--bank", help="the bank file (.safetensors); offline runs")
    p.add_argument("--data", required=True, help="labelled examples: .tsv, .csv or .jsonl")
    p.add_argument("--out", help="the profile file to write (.xpm); offline runs")
    p.add_argument("--model", default=None, help="encoder (default: the one the bank was built for)")
    d = TrainConfig()  # one set of defaults for the CLI, the Python API and the evaluation
    p.add_argument("--method", choices=METHODS, default=d.method, help="what to train (docs/METHOD.md)")
    p.add_argument(
        "--k",
        type=int,
        default=d.k,
        help="hard: adapters kept per layer (default N/10); units: units (default 4r)",
    )
    _data_args(p)
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the data")
    p.add_argument(
        "--lr",
        "--lr-scores",
        dest="lr_scores",
        type=float,
        default=d.lr_scores,
        help="hard, units, soft: the mask scores' learning rate",
    )
    p.add_argument("--lr-head", type=float, default=d.lr_head, help="the head's learning rate")
    p.add_argument(
        "--lr-adapter", type=float, default=d.lr_adapter, help="single_adapter: the adapter's learning rate"
    )
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="hard, soft: the masks' softmax temperature"
    )
    p.add_argument(
        "--scale-power", type=float, default=d.scale_power, help="hard: a selected adapter weighs 1/k**p"
    )
    _switch(p, "--gain", d.gain, "hard: learn one gain per layer, stored in the profile")
    p.add_argument(
        "--gain-init",
        type=float,
        default=d.gain_init,
        help="hard, units: the gains' starting value (default 1 for hard, 0.1 for units)",
    )
    _switch(
        p, "--weighted", d.weighted, "hard: learn a weight for each selected adapter, stored in the profile"
    )
    p.add_argument(
        "--lr-gain", type=float, default=d.lr_gain, help="hard, units: learning rate of gains and weights"
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d.estimator,
        help="hard, units: straight-through surrogate (default softmax for hard, identity for units)",
    )
    _switch(p, "--tied", d.tied, "units: one selection per unit for both projections")
    _switch(
        p, "--out-scale", d.out_scale, "units: learn a per-layer output scaling vector (int8 in the profile)"
    )
    p.add_argument(
        "--lr-out-scale", type=float, default=d.lr_out_scale, help="units: the output scaling vector's rate"
    )
    p.add_argument(
        "--head-init",
        choices=HEAD_INITS,
        default=d.head_init,
        help="the head's start: small random weights, or each label's mean embedding (one extra pass)",
    )
    p.add_argument(
        "--score-optimizer",
        choices=SCORE_OPTIMIZERS,
        default=d.score_optimizer,
        help="hard, soft, units: how the mask scores step (adam: each by its own scale; sgd: in "
        "proportion to its gradient)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per training step")
    p.add_argument(
        "--max-length", type=int, default=d.max_length, help="tokens per input (longer ones are truncated)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the scores, the head and the shuffling")
    p.add_argument("--eval-data", default=None, help="labelled data scored after each epoch")
    _abstain_args(p, d)
    _run_args(p)
    jobs.add_remote_args(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "eval", help="score a profile on labelled data: accuracy, n, f1 (two labels) or f1_macro, mcc"
    )
    p.add_argument("--bank", required=True, help="the bank the profile was trained on")
    p.add_argument("--profile", required=True, help="the profile file (.xpm)")
    p.add_argument("--data", required=True, help="labelled examples: .tsv, .csv or .jsonl")
    p.add_argument("--model", default=None, help="encoder (default: the one the bank was built for)")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE, help="inputs per forward")
    _data_args(p)
    _run_args(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("info", help="print a profile file's metadata as JSON")
    p.add_argument("file", help="the .xpm file")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "predict", help="predict offline (--bank, --profile) or through a server (--url, --id)"
    )
    p.add_argument("texts", nargs="+", help="the texts to classify")
    p.add_argument("--bank", help="offline: the bank file")
    p.add_argument("--profile", help="offline: the profile file (.xpm)")
    p.add_argument("--model", default=None, help="offline: encoder (default: the bank's)")
    p.add_argument("--pair-sep", default=None, help="split each text into a pair at this separator")
    p.add_argument("--url", help="a server, e.g. http://127.0.0.1:8000 (with --id)")
    p.add_argument("--id", dest="profile_id", help="the profile's id on the server")
    p.add_argument("--token", default=None, help=TOKEN_HELP)
    _min_confidence(p, None, "this call's operating point for the profile's abstention rule, in [0, 1]")
    p.set_defaults(func=cmd_predict)


def _fraction(text: str) -> float:
    """A number in [0, 1], for operating points."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def _min_confidence(p: argparse.ArgumentParser, default: float | None, help: str) -> None:
    p.add_argument("--min-confidence", type=_fraction, default=default, help=help)


def _abstain_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The abstention rule's flags (docs/TRAINING.md)."""
    _switch(p, "--abstain", d.abstain, "fit an out-of-scope rule on a held-out part of the data")
    p.add_argument(
        "--abstain-score", choices=ABSTAIN_SCORES, default=d.abstain_score, help="what the rule reads"
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=d.holdout,
        help="fraction of each label held out to calibrate the rule",
    )
    _min_confidence(
        p,
        d.min_confidence,
        "the rule's operating point in [0, 1] (default: picked on --oos-label rows, else the point "
        f"where at most {DEFAULT_ABSTAIN_RATE * 100:g}%% of in-scope rows abstain, placed on the held-out rows)",
    )
    p.add_argument(
        "--oos-label", default=d.oos_label, help="rows with this label are out-of-scope examples, not a class"
    )
    p.add_argument(
        "--fallback-label", default=d.fallback_label, help="answer this label instead of none when abstaining"
    )
