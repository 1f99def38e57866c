"""``xpeft upload``, ``xpeft profiles list|get|delete|download`` and ``xpeft predict --url``.

Every request goes through :class:`xpeft.client.Client` (which builds the URLs, reads the
token variables when no ``--token`` is given, and retries what the server asks to retry), so the
commands and the client refuse the same things with the same codes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xpeft.adapters.errors import XPeftError
from xpeft.cli.output import parse_inputs, positive_int, print_json, writable_target, write_atomically

if TYPE_CHECKING:
    from xpeft.client import Client

TOKEN_HELP = (
    "bearer token (default: $XPEFT_ADMIN_TOKEN for writes; $XPEFT_API_TOKEN, else "
    "$XPEFT_ADMIN_TOKEN, for reads; then $XPEFT_TOKEN)"
)


def _client(args: argparse.Namespace) -> Client:
    from xpeft.client import Client

    return Client(args.url, token=args.token)


def predict_remote(args: argparse.Namespace) -> None:
    """``xpeft predict --url URL --id ID [--token T] [--pair-sep S] TEXT...``: same output as offline."""
    if not args.profile_id:
        raise XPeftError("bad_argument", "predict --url needs --id")
    with _client(args) as client:
        texts = parse_inputs(args.texts, args.pair_sep)
        result = client.predict(args.profile_id, texts, getattr(args, "min_confidence", None))
    print_json([{"input": t, **p} for t, p in zip(args.texts, result["predictions"], strict=True)])


def cmd_upload(args: argparse.Namespace) -> None:
    """``xpeft upload PROFILE.xpm --id ID --url URL [--token T]``: prints the stored metadata."""
    path = Path(args.file)
    if not path.is_file():
        raise XPeftError("not_found", f"no profile file at {path}")
    with _client(args) as client:
        print_json(client.upload(args.profile_id, path))


def cmd_list(args: argparse.Namespace) -> None:
    """Every stored profile's metadata, in id order (all pages), as one JSON list."""
    with _client(args) as client:
        print_json(list(client.iter_profiles(page_size=args.page_size)))


def cmd_get(args: argparse.Namespace) -> None:
    with _client(args) as client:
        print_json(client.get(args.profile_id))


def cmd_delete(args: argparse.Namespace) -> None:
    with _client(args) as client:
        print_json(client.delete(args.profile_id))


def cmd_download(args: argparse.Namespace) -> None:
    """Write a stored profile's bytes, exactly as uploaded, to a file (default ``ID.xpm``)."""
    from xpeft.client import profile_path

    profile_path(args.profile_id)  # an invalid id is refused before the output path is chosen
    out = writable_target(Path(args.out or f"{args.profile_id}.xpm"), args.force)
    with _client(args) as client:
        data = client.download(args.profile_id)
    write_atomically(out, data)
    print_json({"id": args.profile_id, "out": str(out), "bytes": len(data)})


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", default=None, help=TOKEN_HELP)


def register(subparsers: Any) -> None:
    """Add ``upload`` and ``profiles`` (``predict --url`` is part of ``predict``)."""
    p = subparsers.add_parser("upload", help="upload a profile file to a server")
    p.add_argument("file", help="the .xpm file")
    p.add_argument("--id", dest="profile_id", required=True, help="the profile's id on the server")
    _server_args(p)
    p.set_defaults(func=cmd_upload)

    group = subparsers.add_parser(
        "profiles", help="list, show, delete or download profiles stored on a server"
    )
    sub = group.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="every stored profile's metadata, in id order")
    p.add_argument(
        "--page-size", type=positive_int, default=100, help="profiles per request (the server caps it)"
    )
    _server_args(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("get", help="one profile's metadata and current version")
    p.add_argument("profile_id", metavar="ID", help="the profile's id on the server")
    _server_args(p)
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("delete", help="delete a profile")
    p.add_argument("profile_id", metavar="ID", help="the profile's id on the server")
    _server_args(p)
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("download", help="save a profile's .xpm bytes, exactly as uploaded")
    p.add_argument("profile_id", metavar="ID", help="the profile's id on the server")
    p.add_argument("--out", default=None, help="the file to write (default: ID.xpm)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    _server_args(p)
    p.set_defaults(func=cmd_download)
