"""What every command shares: JSON on stdout and the reading of inputs from the command line."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

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
