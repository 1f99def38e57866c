"""What every command shares: JSON on stdout, inputs and checked values from the command line,
and output files written whole or not at all."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from xpeft.adapters.errors import XPeftError

if TYPE_CHECKING:  # torch loads only when a command runs
    from xpeft.adapters.encoder import TextInput


def print_json(obj: object) -> None:
    """Commands print one JSON document, human-readable and with non-ASCII text kept as is."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def parse_inputs(texts: list[str], pair_sep: str | None) -> list[TextInput]:
    """Command-line texts as inputs: ``--pair-sep`` splits each text holding it into a pair."""
    out: list[TextInput] = []
    for text in texts:
        if pair_sep and pair_sep in text:
            first, second = text.split(pair_sep, 1)
            out.append((first, second))
        else:
            out.append(text)
    return out


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (else one ``error: bad_argument:`` line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def writable_target(path: Path, force: bool) -> Path:
    """Refuse an output path that cannot be written, before any work is done."""
    if path.is_dir():
        raise XPeftError("bad_argument", f"{path} is a folder; name a file")
    if path.exists() and not force:
        raise XPeftError("bad_argument", f"{path} exists; pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise XPeftError("bad_argument", f"no folder {parent} to write {path.name} into")
    if not os.access(parent, os.W_OK):
        raise XPeftError("bad_argument", f"folder {parent} is not writable")
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """The whole file or none of it: written beside the target, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
