"""``xpeft bank create | from-adapters | import-adapterhub | info``: build or inspect an adapter bank."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import positive_int, print_json

MODEL_HELP = "encoder: minilm (the bundled MiniLM-L6), a model folder or a hub id (families: docs/INSTALL.md)"


def cmd_create(args: argparse.Namespace) -> None:
    """A seeded random bank for the named encoder."""
    from xpeft.adapters.bank import create_random_bank
    from xpeft.adapters.encoder import canonical_model_name, load_encoder

    enc = load_encoder(args.model, device="cpu", revision=args.revision)
    bank = create_random_bank(
        enc.num_layers,
        enc.hidden_size,
        enc.model_id,
        args.n,
        args.reduction_factor,
        args.seed,
        args.init_scale,
        model_name=canonical_model_name(args.model),
        model_revision=args.revision or "",
    )
    bank.save(args.out)
    print_json({"out": str(args.out), **bank.metadata(), "bytes": Path(args.out).stat().st_size})


def cmd_from_adapters(args: argparse.Namespace) -> None:
    """Stack ``single_adapter`` profiles, all trained for one encoder, into a bank."""
    from xpeft.adapters.bank import stack_adapters
    from xpeft.profiles import format as xpm
    from xpeft.profiles.kinds import KINDS

    own = [kind.value for kind, spec in KINDS.items() if spec.fusion == "own"]  # whole adapters
    adapters, model_ids, model_names = [], set(), set()
    for path in args.adapters:
        profile = xpm.load(path)
        if profile.kind.spec.fusion != "own":
            raise XPeftError(
                "bad_argument",
                f"{path} is a {profile.kind.value} profile; from-adapters stacks "
                f"profiles of an adapter of their own (trained with --method {' or '.join(own)})",
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
    print_json({"out": str(args.out), **bank.metadata()})


def cmd_import(args: argparse.Namespace) -> None:
    """Stack Pfeiffer adapters saved by the AdapterHub ``adapters`` library."""
    from xpeft.adapters.adapterhub import import_adapterhub
    from xpeft.adapters.encoder import canonical_model_name, load_encoder

    enc = load_encoder(args.model, device="cpu", revision=args.revision)
    bank = import_adapterhub(
        args.folders,
        enc.model_id,
        enc.num_layers,
        enc.hidden_size,
        model_name=canonical_model_name(args.model),
    )
    if args.revision:
        bank.extra["model_revision"] = args.revision
    bank.save(args.out)
    print_json({"out": str(args.out), **bank.metadata()})


def cmd_info(args: argparse.Namespace) -> None:
    """A bank file's metadata (loading it checks its content against its id)."""
    from xpeft.adapters.bank import AdapterBank

    bank = AdapterBank.load(args.bank)
    print_json({**bank.metadata(), "bytes": Path(args.bank).stat().st_size})


def register(subparsers: Any) -> None:
    """Add ``bank`` and its subcommands to the ``xpeft`` command."""
    bank = subparsers.add_parser("bank", help="build or inspect an adapter bank").add_subparsers(
        dest="bank_command", required=True
    )
    p = bank.add_parser("create", help="a seeded random bank")
    p.add_argument("--out", required=True, help="the bank file to write (.safetensors)")
    p.add_argument("--model", default="minilm", help=MODEL_HELP)
    p.add_argument("--n", type=positive_int, default=100, help="adapters per layer")
    p.add_argument(
        "--reduction-factor",
        type=positive_int,
        default=16,
        help="an adapter's bottleneck is the hidden size divided by this",
    )
    p.add_argument("--seed", type=int, default=0, help="the same seed and shapes give the same bank")
    p.add_argument(
        "--init-scale", type=float, default=1.0, help="scales the random weights (1: output ~ input scale)"
    )
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub model id, recorded in the bank so every later load gets the same weights",
    )
    p.set_defaults(func=cmd_create)
    p = bank.add_parser("from-adapters", help="stack single adapters (single_adapter profiles) into a bank")
    p.add_argument("--out", required=True, help="the bank file to write (.safetensors)")
    p.add_argument("adapters", nargs="+", help="profile files trained with --method single_adapter")
    p.set_defaults(func=cmd_from_adapters)
    p = bank.add_parser("import-adapterhub", help="stack AdapterHub / adapters-library Pfeiffer adapters")
    p.add_argument("--out", required=True, help="the bank file to write (.safetensors)")
    p.add_argument("--model", default="minilm", help=MODEL_HELP)
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub model id, recorded in the bank so every later load gets the same weights",
    )
    p.add_argument("folders", nargs="+", help="folders of saved Pfeiffer adapters")
    p.set_defaults(func=cmd_import)
    p = bank.add_parser("info", help="print a bank's metadata")
    p.add_argument("bank", help="the bank file")
    p.set_defaults(func=cmd_info)
