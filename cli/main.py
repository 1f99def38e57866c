"""The ``xpeft`` parser and entry point: every subcommand, one error format, one exit status.

Every failure the user can cause, a bad flag included, ends in one line
``error: <code>: <message>`` on stderr and exit status 2, never a traceback. Building the parser
imports neither torch nor the web stack, so ``xpeft --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from xpeft.adapters.errors import XPeftError
from xpeft.cli import bank, demo, profiles, remote, serve, worker

EXIT_USER_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if nothing or action.required or "%(default)" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)".lstrip()
        return text


class Parser(argparse.ArgumentParser):
    """Subcommands get this class too (argparse passes the parent's class down), so every
    help shows defaults and every usage error is one ``error: bad_argument:`` line."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        # no abbreviations: `serve --admin-token X` must not pass for `--admin-token-file X`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"error: bad_argument: {message} (see `{self.prog} --help`)\n")


def package_version() -> str:
    """The installed distribution's version (``unknown`` when run from an uninstalled tree)."""
    try:
        return version("xpeft")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each module adds its own subcommands."""
    parser = Parser(prog="xpeft", description="X-PEFT profiles over one frozen adapter bank.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    bank.register(sub)
    profiles.register(sub)
    remote.register(sub)
    serve.register(sub)
    worker.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is 0, 2 for a user error, or 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
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
