"""Logging of the server process: one format for every logger (ours and uvicorn's), text or JSON,
each line carrying the id of the request it belongs to.

``XPEFT_LOG_FORMAT=json`` (``xpeft serve --log-format json``) writes one JSON object per line
through python-json-logger: ``time``, ``level``, ``logger``, ``message``, ``request_id`` and, on
access lines, ``client``, ``method``, ``path`` and ``status``. The access log's query redaction
(:func:`xpeft.server.middleware.redact_access_log`) is a filter on the ``uvicorn.access`` logger
itself, so it runs before either formatter sees the line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from xpeft.server.errors import request_id_var

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# uvicorn's loggers: they lose their own handlers and propagate to the root handler configured here.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or ``-`` outside any request) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


class XpeftJsonFormatter(JsonFormatter):
    """python-json-logger's formatter, with uvicorn's access line also split into fields."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict) -> None:
        super().add_fields(log_data, record, message_dict)
        args = record.args
        # uvicorn.access: '%s - "%s %s HTTP/%s" %d' % (client, method, path, http version, status)
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _, status = args
            log_data.update(client=client, method=method, path=path, status=status)


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter of ``fmt`` (text lines, or one JSON object per line)."""
    if fmt == "json":
        return XpeftJsonFormatter(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's coloured copy of the message
            json_ensure_ascii=False,
        )
    return logging.Formatter(TEXT_FORMAT)


def configure_logging(level: str, fmt: LogFormat = "text", stream: Any = None) -> logging.Handler:
    """One handler on the root logger (replacing any), in ``fmt``; uvicorn's loggers go through it.

    Call it before uvicorn starts, and give uvicorn ``log_config=None`` so that it keeps this setup.
    Returns the handler (tests read what it writes through ``stream``).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
