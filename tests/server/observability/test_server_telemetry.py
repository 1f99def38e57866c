"""The optional OpenTelemetry hook: when it turns on, and the spans it records (in-memory exporter)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from xpeft.adapters.errors import XPeftError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.server import telemetry
from xpeft.server.app import create_app
from xpeft.server.settings import Settings


@pytest.mark.parametrize(
    ("otel", "environ", "expected"),
    [
        (None, {}, False),
        (None, {"OTEL_SERVICE_NAME": "x"}, False),  # naming a service exports nothing
        (None, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (None, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        (True, {}, True),
    ],
)
def test_when_tracing_is_wanted(otel, environ, expected) -> None:
    assert telemetry.wanted(Settings(otel=otel), environ) is expected


def test_asked_for_without_the_packages_is_a_startup_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(telemetry, "available", lambda: False)
    with pytest.raises(XPeftError) as err:
        telemetry.setup(None, Settings(otel=True))  # type: ignore[arg-type]
    assert err.value.code == "otel_unavailable" and "xpeft[otel]" in err.value.message
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")  # only implied: the server runs untraced
    assert telemetry.setup(None, Settings()) is None  # type: ignore[arg-type]


def test_requests_become_spans_with_route_and_request_id(encoder, bank, profile_bytes, tmp_path) -> None:
    pytest.importorskip("opentelemetry.instrumentation.fastapi", reason="the otel extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # what opentelemetry-instrument would have configured
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was set earlier in this process")
    settings = Settings(sqlite_path=tmp_path / "p.sqlite3", otel=True)
    app = create_app(settings, model=MultiProfileModel(encoder, bank))
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        assert client.put("/profiles/traced", content=profile_bytes(3)).status_code == 201
        answer = client.post(
            "/profiles/traced/predict", json={"inputs": ["a lovely film"]}, headers={"X-Request-ID": "span-1"}
        )
        assert answer.status_code == 200
        assert client.get("/profiles/none", headers={"X-Request-ID": "span-2"}).status_code == 404
        assert client.get("/healthz").status_code == 200  # probes are not traced
    servers = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    by_id = {s.attributes.get("xpeft.request_id"): s for s in servers}
    assert by_id["span-1"].attributes["http.route"] == "/profiles/{profile_id}/predict"
    assert by_id["span-2"].attributes["http.route"] == "/profiles/{profile_id}"
    status = by_id["span-2"].attributes.get(
        "http.response.status_code", by_id["span-2"].attributes.get("http.status_code")
    )
    assert status == 404
    assert not [s for s in servers if "healthz" in s.name]
    assert len(servers) == 3  # the PUT, the predict, the 404
