"""``xpeft upload`` and ``xpeft predict --url``: a running server, through the Python client.

Every request goes through :class:`xpeft.server.client.Client` (which builds the URLs and reads
``$XPEFT_TOKEN`` when no ``--token`` is given), so the command and the client refuse the same
things with the same codes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import parse_inputs, print_json


def predict_remote(args: argparse.Namespace) -> None:
    """``xpeft predict --url URL --id ID [--token T] [--pair-sep S] TEXT...``: same output as offline."""
    from xpeft.server.client import Client

    if not args.profile_id:
        raise XPeftError("bad_argument", "predict --url needs --id")
    with Client(args.url, token=args.token) as client:
        result = client.predict(args.profile_id, parse_inputs(args.texts, args.pair_sep))
    print_json([{"input": t, **p} for t, p in zip(args.texts, result["predictions"], strict=True)])


def cmd_upload(args: argparse.Namespace) -> None:
    """``xpeft upload PROFILE.xpm --id ID --url URL [--token T]``: prints the stored metadata."""
    from xpeft.server.client import Client

    path = Path(args.file)
    if not path.is_file():
        raise XPeftError("not_found", f"no profile file at {path}")
    with Client(args.url, token=args.token) as client:
        print_json(client.upload(args.profile_id, path))


def register(subparsers: Any) -> None:
    """Add ``upload`` to the ``xpeft`` command (``predict --url`` is part of ``predict``)."""
    p = subparsers.add_parser("upload", help="upload a profile file to a server")
    p.add_argument("file", help="the .xpm file")
    p.add_argument("--id", dest="profile_id", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--token", default=None, help="admin token (default: $XPEFT_TOKEN)")
    p.set_defaults(func=cmd_upload)
