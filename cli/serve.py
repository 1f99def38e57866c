"""``xpeft serve``: one flag per server setting, on top of ``XPEFT_*`` environment variables.

The flags are generated from :class:`xpeft.server.settings.Settings` itself, so a new setting is a
new flag with no list to keep. Secrets (tokens, passwords) get no flag: a process listing would
show it. They come from the environment, or from a file named by their ``--*-file`` flag.
Running the process (uvicorn, the SIGTERM drain) is :func:`xpeft.server.runner.run_server`'s job.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import SecretStr

from xpeft.adapters.errors import XPeftError
from xpeft.server.settings import Settings

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation allows, ``None`` left out (``Path | None`` -> ``(Path,)``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for t in typing.get_args(annotation) if t is not type(None))
    return (annotation,)


def is_secret(info: FieldInfo) -> bool:
    """Settings that hold a secret's value (never a flag)."""
    return SecretStr in _types(info.annotation)


def flag_settings() -> dict[str, FieldInfo]:
    """Every setting that ``xpeft serve`` takes as a flag, by field name."""
    return {name: info for name, info in Settings.model_fields.items() if not is_secret(info)}


def _add_setting(p: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    """``--a-name`` for ``a_name``, typed and described from the field. Its argparse default is
    None, so that an unset flag leaves the environment's value; the help shows the setting's default."""
    allowed = _types(info.annotation)
    default = "none" if info.default is None else info.default
    if isinstance(default, Path):
        default = str(default)
    text = f"{info.description or name.replace('_', ' ')} (env XPEFT_{name.upper()}; default: {default})"
    text = text.replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text}
    kind = allowed[0] if len(allowed) == 1 else str
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    else:
        kwargs["type"] = kind if kind in (int, float) else str
        kwargs["metavar"] = "N" if kind in (int, float) else name.split("_")[-1].upper()
    p.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def build_settings(args: argparse.Namespace) -> Settings:
    """Environment first, flags on top; a bad value is a clear ``bad_argument`` error."""
    from pydantic import ValidationError

    overrides = {
        name: getattr(args, name) for name in flag_settings() if getattr(args, name, None) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))))
            for e in exc.errors()
        )
        raise XPeftError("bad_argument", problems) from exc
    if settings.bank is None:
        raise XPeftError("bad_argument", "serve needs --bank (or XPEFT_BANK)")
    return settings


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C; bad settings fail before the port opens."""
    from xpeft.server.runner import run_server

    run_server(build_settings(args))


def register(subparsers: Any) -> None:
    """Add ``serve`` to the ``xpeft`` command."""
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the HTTP server. Every setting is an XPEFT_* environment variable; the flag "
        "of the same name overrides it. Tokens and passwords have no flag (a process listing would "
        "show them): set them in the environment or name a file with their --*-file flag.",
    )
    for name, info in flag_settings().items():
        _add_setting(p, name, info)
    p.set_defaults(func=cmd_serve)
