"""The ``xpeft`` parser and entry point: every subcommand, one error format, one exit status.

Every failure the user can cause ends in one line ``error: <code>: <message>`` on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xpeft.adapters.errors import XPeftError
from xpeft.cli import bank, profiles, remote, serve

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; each module adds its own subcommands."""
    parser = argparse.ArgumentParser(
        prog="xpeft", description="X-PEFT profiles over one frozen adapter bank."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bank.register(sub)
    profiles.register(sub)
    serve.register(sub)
    remote.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is 0, 2 for a user error, or 130 on Ctrl-C."""
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
