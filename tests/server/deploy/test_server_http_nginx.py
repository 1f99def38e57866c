"""docker/nginx.conf, run for real on loopback (Debian's nginx; skipped where it is not installed):
a draining replica's 503 is retried on the other, predictions included; /metrics and the OpenAPI
pages are not served; the version is not announced; a client over its rate gets the JSON 429.

The copy under test (testsupport/nginx.py renders it; the ``nginx`` fixture in
tests/server/conftest.py starts it) differs from the file only in addresses, log paths and (for the
rate test) a small rate, so that the run is quick and touches nothing but loopback.
tests/server/deploy/test_server_affinity.py checks the routing by profile id.
"""

from __future__ import annotations

import json
import socket

import httpx


def test_a_draining_replica_is_skipped_for_every_method_and_ops_pages_are_private(nginx, stand_in) -> None:
    draining = stand_in(503, {"error": "shutting_down", "message": "draining"})
    healthy = stand_in(200, {"ok": True})
    url = nginx([draining.server_port, healthy.server_port]).url
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(6):  # whichever replica nginx picks first
            assert client.post("/profiles/p-1/predict", json={"inputs": ["x"]}).json() == {"ok": True}
            assert client.put("/profiles/p-1", content=b"x").status_code == 200
            assert client.delete("/profiles/p-1").status_code == 200
            assert client.get("/profiles").status_code == 200
        for private in ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            answer = client.get(private)
            assert answer.status_code == 404 and answer.json()["error"] == "not_found", private
        assert client.get("/healthz").headers["server"] == "nginx"  # no version


def test_a_client_over_its_rate_gets_json_429(nginx, stand_in) -> None:
    healthy = stand_in(200, {"ok": True})
    url = nginx([healthy.server_port, healthy.server_port], rate="1r/s").url
    with httpx.Client(base_url=url, timeout=10) as client:
        answers = [client.get("/healthz") for _ in range(6)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited and limited[0].json()["error"] == "overloaded"
    assert limited[0].headers["retry-after"] == "1"


def test_nginx_answers_its_own_refusals_as_json(nginx, stand_in) -> None:
    healthy = stand_in(200, {"ok": True})
    url = nginx([healthy.server_port, healthy.server_port]).url
    with httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/profiles/p-1", "/profiles/p-1/predict"):  # the predict location has its own list
            method = "PUT" if path == "/profiles/p-1" else "POST"
            answer = client.request(method, path, content=b"x" * (9 * 2**20))  # over client_max_body_size
            assert answer.status_code == 413, path
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["error"] == "too_large"
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\nHost x\r\n\r\n")  # a header line without a colon
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and b"application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_request"


MALFORMED = {
    # request lines nginx cannot parse: no URI yet, so no error page that needs one may run
    "no URI": (b"GET  HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "a control byte in the method": (b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "a lower-case method": (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "user info in an absolute URI": (
        b"GET http://user@x/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_request",
    ),
    "a 20 KB request line": (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "too_large"),
    "a 40 KB header": (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40_000 + b"\r\n\r\n", 431, "too_large"),
    "HTTP/1.1 without Host": (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "a transfer coding nginx lacks": (
        b"POST /profiles/p-1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "not_implemented",
    ),
    "HTTP/2.0 as text": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    "HTTP/3.1": (b"GET / HTTP/3.1\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    "its error pages from outside": (
        b"GET /_xpeft_error/400 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        404,
        "not_found",
    ),
}


def test_every_error_nginx_raises_itself_is_json_even_before_the_uri_parses(nginx, stand_in) -> None:
    healthy = stand_in(200, {"ok": True})
    url = nginx([healthy.server_port, healthy.server_port]).url
    host, port = url.removeprefix("http://").split(":")
    for case, (raw, status, code) in MALFORMED.items():
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(status).encode(), (case, head[:80])
        assert b"content-type: application/json" in head.lower(), (case, head)
        assert json.loads(body)["error"] == code, (case, body[:200])
