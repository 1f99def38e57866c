"""Typed errors with stable codes, shared by the library, the CLI and the HTTP server."""

from __future__ import annotations


class XPeftError(Exception):
    """Base error: ``code`` is stable (clients and tests match on it), ``message`` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BankError(XPeftError):
    """A bank file that is missing, malformed, or does not fit the encoder."""


class ModelError(XPeftError):
    """An encoder that cannot be loaded or is not of a supported (BERT-family) architecture."""
