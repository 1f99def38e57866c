"""The ``xpeft`` command line: a thin layer over the Python API.

Every failure the user can cause ends in one line ``error: <code>: <message>`` on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from xpeft.adapters.errors import XPeftError

EXIT_USER_ERROR = 2


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _encoder_for(bank, model: str | None, device: str | None = None):
    from xpeft.adapters.encoder import DEFAULT_MODEL, load_encoder
    from xpeft.profiles.runtime import best_device

    return load_encoder(model or bank.model_name or DEFAULT_MODEL, device=device or best_device())


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-col", default="sentence")
    p.add_argument("--text-pair-col", default=None)
    p.add_argument("--label-col", default="label")


def _load_data(path: str, args):
    from xpeft.profiles.data import load_dataset

    return load_dataset(path, args.text_col, args.text_pair_col, args.label_col)


# -- bank --------------------------------------------------------------------------------------
def cmd_bank_create(args) -> None:
    from xpeft.adapters.bank import create_random_bank
    from xpeft.adapters.encoder import load_encoder

    enc = load_encoder(args.model, device="cpu")
    bank = create_random_bank(
        enc.num_layers,
        enc.hidden_size,
        enc.model_id,
        args.n,
        args.reduction_factor,
        args.seed,
        args.init_scale,
        model_name=args.model,
    )
    bank.save(args.out)
    _print_json({"out": str(args.out), **bank.metadata(), "bytes": Path(args.out).stat().st_size})


def cmd_bank_from_adapters(args) -> None:
    from xpeft.adapters.bank import stack_adapters
    from xpeft.profiles import format as xpm
    from xpeft.profiles.profile import ProfileKind

    adapters, model_ids, model_names = [], set(), set()
    for path in args.adapters:
        profile = xpm.load(path)
        if profile.kind is not ProfileKind.ADAPTER:
            raise XPeftError(
                "bad_argument",
                f"{path} is a {profile.kind.value} profile; from-adapters stacks "
                "profiles trained with --method single_adapter",
            )
        adapters.append(profile.adapter_tensors())
        model_ids.add(profile.model_id)
        model_names.add(profile.meta.get("model_name", ""))
    if len(model_ids) != 1:
        raise XPeftError(
            "bank_mismatch", f"adapters were trained for different encoders: {sorted(model_ids)}"
        )
    bank = stack_adapters(
        adapters,
        model_id=model_ids.pop(),
        init="trained",
        model_name=model_names.pop() if len(model_names) == 1 else "",
    )
    bank.save(args.out)
    _print_json({"out": str(args.out), **bank.metadata()})


def cmd_bank_import(args) -> None:
    from xpeft.adapters.adapterhub import import_adapterhub
    from xpeft.adapters.encoder import load_encoder

    enc = load_encoder(args.model, device="cpu")
    bank = import_adapterhub(
        args.folders, enc.model_id, enc.num_layers, enc.hidden_size, model_name=args.model
    )
    bank.save(args.out)
    _print_json({"out": str(args.out), **bank.metadata()})


def cmd_bank_info(args) -> None:
    from xpeft.adapters.bank import AdapterBank

    bank = AdapterBank.load(args.bank)
    _print_json({**bank.metadata(), "bytes": Path(args.bank).stat().st_size})


# -- profiles ----------------------------------------------------------------------------------
def cmd_train(args) -> None:
    from xpeft.adapters.bank import AdapterBank
    from xpeft.profiles import format as xpm
    from xpeft.profiles.train import TrainConfig, train_profile

    bank = AdapterBank.load(args.bank)
    encoder = _encoder_for(bank, args.model)
    train = _load_data(args.data, args)
    eval_data = _load_data(args.eval_data, args) if args.eval_data else None
    config = TrainConfig(
        method=args.method,
        k=args.k,
        epochs=args.epochs,
        lr_scores=args.lr_scores,
        lr_head=args.lr_head,
        lr_adapter=args.lr_adapter,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        temperature=args.temperature,
    )
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
    _print_json(summary)


def cmd_eval(args) -> None:
    from xpeft.adapters.bank import AdapterBank
    from xpeft.profiles.evaluate import evaluate
    from xpeft.profiles.runtime import MultiProfileModel

    bank = AdapterBank.load(args.bank)
    model = MultiProfileModel(_encoder_for(bank, args.model), bank)
    profile = model.load_profile(args.profile)
    _print_json(evaluate(model, profile, _load_data(args.data, args), batch_size=args.batch_size))


def cmd_info(args) -> None:
    from xpeft.profiles import format as xpm

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise XPeftError("not_found", f"cannot read {args.file}: {exc.strerror}") from exc
    _print_json(xpm.read_info(data).as_dict())


def cmd_predict(args) -> None:
    if args.url:
        from xpeft.server.client import predict_cli

        predict_cli(args)
        return
    if not (args.bank and args.profile):
        raise XPeftError(
            "bad_argument", "predict needs --bank and --profile (offline) or --url and --id (server)"
        )
    from xpeft.adapters.bank import AdapterBank
    from xpeft.profiles.runtime import MultiProfileModel

    bank = AdapterBank.load(args.bank)
    model = MultiProfileModel(_encoder_for(bank, args.model), bank)
    profile = model.load_profile(args.profile)
    inputs = [
        tuple(t.split(args.pair_sep, 1)) if args.pair_sep and args.pair_sep in t else t for t in args.texts
    ]
    _print_json(
        [{"input": t, **p.as_dict()} for t, p in zip(args.texts, model.predict(profile, inputs), strict=True)]
    )


def cmd_demo(args) -> None:
    """Build a random bank, train a hard-mask profile on the bundled examples, predict."""
    from xpeft.adapters.bank import AdapterBank, create_random_bank
    from xpeft.adapters.encoder import load_encoder
    from xpeft.profiles import format as xpm
    from xpeft.profiles.data import load_dataset
    from xpeft.profiles.runtime import MultiProfileModel
    from xpeft.profiles.train import TrainConfig, train_profile

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
    for text, pred in zip(texts, model.predict(profile, texts), strict=True):
        print(f"{pred.label:>9} {pred.score:.3f}  {text}")


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpeft", description="X-PEFT profiles over one frozen adapter bank."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bank = sub.add_parser("bank", help="build or inspect an adapter bank").add_subparsers(
        dest="bank_command", required=True
    )
    p = bank.add_parser("create", help="a seeded random bank")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--reduction-factor", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-scale", type=float, default=1.0)
    p.set_defaults(func=cmd_bank_create)
    p = bank.add_parser("from-adapters", help="stack single adapters (single_adapter profiles) into a bank")
    p.add_argument("--out", required=True)
    p.add_argument("adapters", nargs="+")
    p.set_defaults(func=cmd_bank_from_adapters)
    p = bank.add_parser("import-adapterhub", help="stack AdapterHub / adapters-library Pfeiffer adapters")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="minilm")
    p.add_argument("folders", nargs="+")
    p.set_defaults(func=cmd_bank_import)
    p = bank.add_parser("info", help="print a bank's metadata")
    p.add_argument("bank")
    p.set_defaults(func=cmd_bank_info)

    p = sub.add_parser("train", help="train a profile")
    p.add_argument("--bank", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help="default: the encoder the bank was built for")
    p.add_argument("--method", choices=["hard", "soft", "single_adapter", "head_only"], default="hard")
    p.add_argument("--k", type=int, default=None, help="hard masks: adapters per layer (default N/10)")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--lr",
        "--lr-scores",
        dest="lr_scores",
        type=float,
        default=0.05,
        help="learning rate of the mask scores",
    )
    p.add_argument("--lr-head", type=float, default=5e-3)
    p.add_argument(
        "--lr-adapter", type=float, default=1e-3, help="single_adapter: the adapter's learning rate"
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a profile on labelled data")
    p.add_argument("--bank", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    _data_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="print a profile file's metadata as JSON")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
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

    p = sub.add_parser("demo", help="random bank + hard profile on the bundled examples + predictions")
    p.add_argument("--workdir", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    if importlib.util.find_spec("xpeft.server.cli") is not None:  # the server adds `serve` and `upload`
        from xpeft.server.cli import register

        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except XPeftError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        print(f"error: io_error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
