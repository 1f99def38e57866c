"""The one text boundary: every string that enters (labels, metadata and ids in ``.xpm`` headers,
training texts and labels, settings) passes :func:`check_text`, and every JSON document that
enters is parsed by :func:`load_json`, with its nesting bounded before any recursion.

Why one place: a string that is valid JSON but not text (a lone UTF-16 surrogate such as
``"\\ud800"``) can be stored but never encoded as UTF-8 again, so every answer that shows it would
fail. Refusing it where it enters, with the same rule everywhere, keeps such a value out of the
stores; :func:`clean_strings` lets readers of older records leave damaged ones out.
"""

from __future__ import annotations

import json
import re

from xpeft.adapters.errors import XPeftError

__all__ = ["MAX_JSON_DEPTH", "TextError", "check_text", "clean_strings", "json_depth", "load_json"]

# Deeper JSON than any request or header of ours needs; far below Python's recursion limit.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
# Unicode's control characters (category Cc), and the same without tab, newline and return.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_MULTILINE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Strings inside JSON (escapes included), removed before brackets are counted.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class TextError(XPeftError):
    """A string that is not acceptable text; ``code`` is ``bad_text``, the message names the field."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_text", message)


def _bad_char(text: str, multiline: bool) -> str | None:
    """A description of the first character that has no place in such a text, or ``None``."""
    match = _SURROGATE.search(text)
    if match:
        return f"a lone UTF-16 surrogate (U+{ord(match.group()):04X}) at {match.start()}"
    match = (_CONTROL_MULTILINE if multiline else _CONTROL).search(text)
    if match:
        return f"a control character (U+{ord(match.group()):04X}) at {match.start()}"
    return None


def check_text(
    value: object,
    what: str,
    max_chars: int,
    *,
    multiline: bool = False,
    allow_empty: bool = False,
) -> str:
    """``value`` as text, or :class:`TextError`: a ``str`` of at most ``max_chars`` characters, valid
    UTF-8 (no lone surrogates), without control characters (tabs and newlines only when
    ``multiline``, as in training texts), and not empty or blank unless ``allow_empty``."""
    if not isinstance(value, str):
        raise TextError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise TextError(f"{what} is empty")
    if len(value) > max_chars:
        raise TextError(f"{what} has {len(value)} characters; at most {max_chars}")
    bad = _bad_char(value, multiline)
    if bad is not None:
        raise TextError(f"{what} holds {bad}: not text")
    return value


def clean_strings(value: object) -> bool:
    """Whether every string in a decoded JSON value (keys included) encodes as UTF-8: what a stored
    record must satisfy to be shown at all."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return True


def json_depth(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``raw``'s arrays and objects nest, counted without parsing (strings skipped); stops
    counting once past ``limit``. Work is linear in the size, which the caller already bounded."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        depth += 1 if byte in (0x5B, 0x7B) else -1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                break
    return deepest


def load_json(raw: bytes | str, what: str = "the body", max_depth: int = MAX_JSON_DEPTH) -> object:
    """``json.loads`` with the nesting checked first; :class:`TextError` for any document that does
    not parse (bad JSON, not UTF-8, too deep), never a ``RecursionError``."""
    if json_depth(raw, max_depth) > max_depth:
        raise TextError(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TextError(f"{what} is not JSON: {exc}"[:300]) from None
