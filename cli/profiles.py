"""``xpeft train | eval | info | predict | demo``: profiles offline, on this machine's encoder.

``predict --url`` goes to a server instead (:mod:`xpeft.cli.remote`), with the same output.
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import parse_inputs, print_json
from xpeft.profiles.train_config import ESTIMATORS, METHODS, TrainConfig

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
    "batch_size",
    "max_length",
    "seed",
)

if TYPE_CHECKING:
    from xpeft.profiles.data import Dataset
    from xpeft.profiles.runtime import MultiProfileModel


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-col", default="sentence")
    p.add_argument("--text-pair-col", default=None)
    p.add_argument("--label-col", default="label")


def _load_data(path: str, args: argparse.Namespace) -> Dataset:
    from xpeft.profiles.data import load_dataset

    return load_dataset(path, args.text_col, args.text_pair_col, args.label_col)


def _model(args: argparse.Namespace) -> MultiProfileModel:
    """``--bank`` with ``--model`` (default: the encoder the bank was built for)."""
    from xpeft.profiles.runtime import MultiProfileModel

    return MultiProfileModel.load(args.bank, args.model)


def cmd_train(args: argparse.Namespace) -> None:
    """Train one profile and write its ``.xpm`` file; prints a JSON summary."""
    from xpeft.adapters.bank import AdapterBank
    from xpeft.adapters.encoder import encoder_for_bank
    from xpeft.profiles import format as xpm
    from xpeft.profiles.train import train_profile

    config = TrainConfig(**{name: getattr(args, name) for name in TRAIN_FLAGS})
    config.validate()  # before anything is loaded, trained or written
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
    print_json(summary)


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy, F1 and Matthews correlation of a profile on labelled data."""
    from xpeft.profiles.evaluate import evaluate

    model = _model(args)
    profile = model.load_profile(args.profile)
    print_json(evaluate(model, profile, _load_data(args.data, args), batch_size=args.batch_size))


def cmd_info(args: argparse.Namespace) -> None:
    """A profile file's header and size, without a bank or an encoder."""
    from xpeft.profiles import format as xpm

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise XPeftError("not_found", f"cannot read {args.file}: {exc.strerror}") from exc
    print_json(xpm.read_info(data).as_dict())


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
    print_json([{"input": t, **p.as_dict()} for t, p in zip(args.texts, predictions, strict=True)])


def cmd_demo(args: argparse.Namespace) -> None:
    """Build a random bank, train a hard-mask profile on the bundled examples, predict."""
    from xpeft.adapters.bank import AdapterBank, create_random_bank
    from xpeft.adapters.encoder import load_encoder
    from xpeft.profiles import format as xpm
    from xpeft.profiles.data import load_dataset
    from xpeft.profiles.runtime import MultiProfileModel
    from xpeft.profiles.train import train_profile

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder("minilm")
    bank_path = work / "bank.safetensors"
    if bank_path.is_file():
        bank = AdapterBank.load(bank_path)
    else:
        bank = create_random_bank(
            encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=100, model_name="minilm"
        )
        bank.save(bank_path)
    print(
        f"bank {bank.bank_id}: L={bank.num_layers} N={bank.num_adapters} d={bank.hidden_size} "
        f"r={bank.bottleneck} -> {bank_path}"
    )
    data = load_dataset(str(files("xpeft.profiles.examples") / "sentiment.tsv"))
    result = train_profile(
        encoder, bank, data, TrainConfig(method="hard", epochs=8, batch_size=16, max_length=32)
    )
    profile_path = work / "sentiment.xpm"
    size = xpm.save(result.profile, profile_path)
    print(
        f"profile -> {profile_path}: {size} bytes, hard masks k={result.profile.k}, "
        f"trained in {result.seconds:.1f}s, final train accuracy {result.history[-1]['train_accuracy']:.2f}"
    )
    model = MultiProfileModel(encoder, bank)
    profile = model.load_profile(profile_path)
    texts = [
        "What a lovely, heartfelt movie.",
        "The food was cold and the waiter was rude.",
        "An inventive and joyful show.",
        "Boring, slow and far too long.",
    ]
    for text, pred in zip(texts, model.predict(profile, list(texts)), strict=True):
        print(f"{pred.label:>9} {pred.score:.3f}  {text}")


def register(subparsers: Any) -> None:
    """Add ``train``, ``eval``, ``info``, ``predict`` and ``demo`` to the ``xpeft`` command."""
    p = subparsers.add_parser("train", help="train a profile")
    p.add_argument("--bank", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="default: the encoder the bank was built for")
    d = TrainConfig()  # one set of defaults for the CLI, the Python API and the evaluation
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument("--k", type=int, default=d.k, help="hard masks: adapters per layer (default: N/10)")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--lr",
        "--lr-scores",
        dest="lr_scores",
        type=float,
        default=d.lr_scores,
        help="mask scores' learning rate",
    )
    p.add_argument("--lr-head", type=float, default=d.lr_head)
    p.add_argument(
        "--lr-adapter", type=float, default=d.lr_adapter, help="single_adapter: the adapter's rate"
    )
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--scale-power", type=float, default=d.scale_power, help="hard: a selected adapter weighs 1/k**p"
    )
    p.add_argument(
        "--gain",
        action=argparse.BooleanOptionalAction,
        default=d.gain,
        help="hard: learn one gain per layer, stored in the profile",
    )
    p.add_argument("--gain-init", type=float, default=d.gain_init, help="hard: the gains' starting value")
    p.add_argument(
        "--weighted",
        action=argparse.BooleanOptionalAction,
        default=d.weighted,
        help="hard: learn a weight for each selected adapter, stored in the profile",
    )
    p.add_argument(
        "--lr-gain", type=float, default=d.lr_gain, help="hard: learning rate of gains and weights"
    )
    p.add_argument(
        "--estimator", choices=ESTIMATORS, default=d.estimator, help="hard: straight-through surrogate"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="score a profile on labelled data")
    p.add_argument("--bank", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    _data_args(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("info", help="print a profile file's metadata as JSON")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser(
        "predict", help="predict offline (--bank, --profile) or through a server (--url, --id)"
    )
    p.add_argument("texts", nargs="+")
    p.add_argument("--bank")
    p.add_argument("--profile")
    p.add_argument("--model", default=None)
    p.add_argument("--pair-sep", default=None, help="split each text into a pair at this separator")
    p.add_argument("--url")
    p.add_argument("--id", dest="profile_id")
    p.add_argument("--token", default=None)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("demo", help="random bank + hard profile on the bundled examples + predictions")
    p.add_argument("--workdir", default="runs/demo")
    p.set_defaults(func=cmd_demo)
