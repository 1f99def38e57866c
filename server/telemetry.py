"""Optional OpenTelemetry tracing: one span per HTTP request, when the ``otel`` extra is installed.

On when ``XPEFT_OTEL=true``; off when ``XPEFT_OTEL=false``; by default on only where an OTEL
exporter variable is set (``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ...) and
the packages are there. The spans go to the process's tracer provider when one is configured
(``opentelemetry-instrument xpeft serve ...``); otherwise to one made here from the standard
``OTEL_*`` variables: the OTLP exporter (``otlp``, the default) or ``console``. Each request's span
carries its ``X-Request-ID`` as ``xpeft.request_id``. Probes and ``/metrics`` are not traced.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI

from xpeft.adapters.errors import XPeftError
from xpeft.server.settings import Settings

log = logging.getLogger("xpeft.server")
EXCLUDED_URLS = "/healthz,/readyz,/metrics"
_EXPORTER_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing was asked for: the setting, else an OTEL exporter variable (not ``none``)."""
    if settings.otel is not None:
        return settings.otel
    env = os.environ if environ is None else environ
    return any(env.get(name, "").strip() not in ("", "none") for name in _EXPORTER_VARS)


def available() -> bool:
    """The FastAPI instrumentation is installed (``pip install 'xpeft[otel]'``)."""
    try:
        import opentelemetry.instrumentation.fastapi  # noqa: F401
    except ImportError:
        return False
    return True


def _default_provider() -> Any:
    """The global tracer provider when something configured one, else one from ``OTEL_*``."""
    from opentelemetry import trace

    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "xpeft"}))  # OTEL_SERVICE_NAME wins
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip()
    if kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        return provider
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise XPeftError(
            "otel_unavailable",
            "no tracer provider is configured and the OTLP exporter is not installed: "
            "pip install 'xpeft[otel]', or run under opentelemetry-instrument",
        ) from None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def tag_request_id(request_id: str) -> None:
    """Record the request's id on the span being served (the server span of the request)."""
    from opentelemetry import trace

    trace.get_current_span().set_attribute("xpeft.request_id", request_id)


def instrument(app: FastAPI, tracer_provider: Any = None) -> Callable[[str], None]:
    """Trace ``app``'s requests into ``tracer_provider`` (default: see the module docstring).

    Call it after every middleware is added, so its span encloses them all. Returns the hook that
    the request-id middleware calls with each id.
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider or _default_provider(), excluded_urls=EXCLUDED_URLS
    )
    return tag_request_id


def setup(app: FastAPI, settings: Settings) -> Callable[[str], None] | None:
    """Instrument ``app`` when tracing is wanted; the request-id hook, or ``None`` when off.

    Asked for explicitly (``XPEFT_OTEL=true``) without the packages: a startup error. Implied by
    OTEL variables only: a warning, and the server runs untraced.
    """
    if not wanted(settings):
        return None
    if not available():
        if settings.otel:
            raise XPeftError(
                "otel_unavailable", "XPEFT_OTEL=true needs the otel extra: pip install 'xpeft[otel]'"
            )
        log.warning("OTEL variables are set but OpenTelemetry is not installed: requests are not traced")
        return None
    hook = instrument(app)
    log.info("OpenTelemetry: tracing HTTP requests")
    return hook
