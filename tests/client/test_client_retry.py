"""The clients' retry policy and token variables, against a scripted HTTP server on loopback.

An xpeft server cannot be made to answer 429, a given ``Retry-After`` or a dropped connection on
demand, so a small real HTTP server (the standard library's) plays those answers in order and
records what arrived and when. Everything else the clients do is tested against xpeft servers.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from xpeft.client import AsyncClient, Client, ClientError
from xpeft.client.core import retry_after_seconds

DROP = "drop"  # close the connection without an answer


class Script:
    """Answers in order (the last one repeats) and the requests that came: (time, method, path, auth)."""

    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.seen: list[tuple[float, str, str, str | None]] = []
        self.lock = threading.Lock()

    def next(self, method: str, path: str, auth: str | None):
        with self.lock:
            self.seen.append((time.monotonic(), method, path, auth))
            return self.answers[min(len(self.seen), len(self.answers)) - 1]

    def gaps(self) -> list[float]:
        times = [t for t, *_ in self.seen]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


def answer(status: int, code: str | None = None, headers: dict | None = None, body: dict | None = None):
    payload = body if body is not None else ({"error": code, "message": code} if code else {"status": "ok"})
    return status, headers or {}, payload


def serve(script: Script, port: int = 0) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            reply = script.next(self.command, self.path, self.headers.get("Authorization"))
            if reply == DROP:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status, headers, payload = reply
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = _any

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def scripted() -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def start(answers: list, port: int = 0) -> tuple[Script, str]:
        script = Script(answers)
        server = serve(script, port)
        servers.append(server)
        return script, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_retry_after_is_honoured_then_the_answer_returned(scripted) -> None:
    busy = answer(503, "overloaded", {"Retry-After": "1"})
    script, url = scripted([busy, busy, answer(200)])
    with Client(url) as client:
        assert client.health() == {"status": "ok"}
    assert len(script.seen) == 3
    assert all(0.95 <= gap < 3 for gap in script.gaps()), script.gaps()


def test_429_with_an_http_date(scripted) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: waits 1 to 2 s
    script, url = scripted([answer(429, "rate_limited", {"Retry-After": when}), answer(200)])
    with Client(url) as client:
        client.health()
    assert len(script.seen) == 2 and 0.9 <= script.gaps()[0] < 4


def test_attempts_are_bounded_and_the_last_refusal_raised(scripted) -> None:
    script, url = scripted([answer(503, "store_unavailable")])  # no Retry-After: short backoff
    with Client(url, max_attempts=3) as client, pytest.raises(ClientError) as err:
        client.get("p1")
    assert (err.value.code, err.value.status, err.value.retryable) == ("store_unavailable", 503, True)
    assert len(script.seen) == 3


def test_no_wait_past_the_time_budget(scripted) -> None:
    script, url = scripted([answer(503, "overloaded", {"Retry-After": "30"})])
    start = time.monotonic()
    with Client(url, max_retry_seconds=5) as client, pytest.raises(ClientError) as err:
        client.predict("p1", ["text"])
    assert err.value.code == "overloaded" and err.value.retry_after == 30
    assert len(script.seen) == 1 and time.monotonic() - start < 3


@pytest.mark.parametrize(
    "reply",
    [
        answer(404, "profile_not_found"),
        answer(422, "invalid_request"),
        answer(401, "unauthorized"),
        answer(503, "model_failed"),  # only a restart cures it
    ],
)
def test_refusals_a_retry_cannot_lift_are_sent_once(scripted, reply) -> None:
    script, url = scripted([reply, answer(200)])
    with Client(url) as client, pytest.raises(ClientError) as err:
        client.get("p1")
    assert err.value.code == reply[2]["error"] and not err.value.retryable
    assert len(script.seen) == 1


def test_a_dropped_connection_is_retried_except_for_delete(scripted) -> None:
    script, url = scripted([DROP, answer(200, body={"id": "p1", "version": 3})])
    with Client(url) as client:
        assert client.get("p1")["version"] == 3
    assert len(script.seen) == 2
    script, url = scripted([DROP, answer(200, body={"id": "p1", "deleted": True})])
    with Client(url) as client, pytest.raises(ClientError) as err:
        client.delete("p1")  # it may have been applied: a second DELETE would answer 404
    assert err.value.code == "connection_error" and len(script.seen) == 1


def test_an_unreachable_server_is_retried_until_it_answers(scripted) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started: list[Script] = []
    timer = threading.Timer(1.0, lambda: started.append(scripted([answer(200)], port)[0]))
    timer.start()
    try:
        with Client(f"http://127.0.0.1:{port}", max_attempts=20, max_retry_seconds=20) as client:
            assert client.health() == {"status": "ok"}
    finally:
        timer.join()
    assert len(started[0].seen) == 1


def test_async_client_honours_retry_after(scripted) -> None:
    busy = answer(503, "overloaded", {"Retry-After": "1"})
    script, url = scripted([busy, answer(200, body={"profile": "p1", "version": 1, "predictions": []})])

    async def go() -> dict:
        async with AsyncClient(url) as client:
            return await client.predict("p1", ["a"])

    assert asyncio.run(go())["version"] == 1
    assert len(script.seen) == 2 and script.gaps()[0] >= 0.95


def test_token_variables_follow_the_server_names(scripted, monkeypatch) -> None:
    meta = {"id": "p1", "version": 1}
    script, url = scripted([answer(200, body=meta)])
    monkeypatch.setenv("XPEFT_ADMIN_TOKEN", "admin-token-0123456789")
    monkeypatch.setenv("XPEFT_API_TOKEN", "api-token-0123456789")
    monkeypatch.setenv("XPEFT_TOKEN", "fallback-token-0123456789")
    with Client(url) as client:
        client.upload("p1", b"bytes")
        client.get("p1")
        client.delete("p1")
        client.predict("p1", ["x"])
    assert [a for *_, a in script.seen] == [
        "Bearer admin-token-0123456789",
        "Bearer api-token-0123456789",
        "Bearer admin-token-0123456789",
        "Bearer api-token-0123456789",
    ]
    monkeypatch.delenv("XPEFT_API_TOKEN")
    with Client(url) as client:
        client.get("p1")  # the admin token may read too
    monkeypatch.delenv("XPEFT_ADMIN_TOKEN")
    with Client(url) as client:
        client.get("p1")
        client.upload("p1", b"bytes")
    with Client(url, token="explicit-token-0123456789") as client:
        client.upload("p1", b"bytes")
        client.get("p1")
    monkeypatch.delenv("XPEFT_TOKEN")
    with Client(url) as client:
        client.get("p1")
    assert [a for *_, a in script.seen[4:]] == [
        "Bearer admin-token-0123456789",
        "Bearer fallback-token-0123456789",
        "Bearer fallback-token-0123456789",
        "Bearer explicit-token-0123456789",
        "Bearer explicit-token-0123456789",
        None,
    ]


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("-3") == 0.0
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_seconds(past) == 0.0


def test_client_settings_are_checked() -> None:
    for bad in ({"max_inputs": 0}, {"max_attempts": 0}, {"max_retry_seconds": -1}):
        with pytest.raises(ValueError):
            Client("http://127.0.0.1:1", **bad)
