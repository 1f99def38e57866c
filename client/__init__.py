"""xpeft.client: the Python clients of an xpeft server's HTTP API.

A package of its own, beside the server rather than inside it: it imports nothing of the server
but the wire's fixed points (:mod:`xpeft.server.wire`) and nothing of torch, so a program that
only calls a server installs and imports little. ``Client`` and ``AsyncClient`` have the same
methods; every refusal raises :class:`ClientError` with the server's stable ``code``.
"""

from __future__ import annotations

from xpeft.client.clients import AsyncClient, Client
from xpeft.client.core import DEFAULT_MAX_INPUTS, ClientError, TextInput, profile_path
from xpeft.client.training import TrainJob

__all__ = [
    "DEFAULT_MAX_INPUTS",
    "AsyncClient",
    "Client",
    "ClientError",
    "TextInput",
    "TrainJob",
    "profile_path",
]
