"""The client and CLI trust a server only so far: a cursor that does not advance, an answer too
large, an answer that trickles in, an answer that is not JSON, and a training POST resent after a
dropped connection. A small hostile HTTP server on loopback plays the server's part; the
resent POST goes to a real ``xpeft serve``."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import httpx
import pytest

from xpeft.cli.main import main
from xpeft.client import AsyncClient, Client, ClientError

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def hostile() -> Iterator[Callable[[Handler], str]]:
    """``hostile(answer) -> url``: a threaded HTTP server whose every GET and POST runs ``answer``."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(answer: Handler) -> str:
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                answer(self)

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def send(handler: http.server.BaseHTTPRequestHandler, body: bytes, kind: str = "application/json") -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def test_a_cursor_that_does_not_advance_ends_the_listing(hostile) -> None:
    pages = []

    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        pages.append(h.path)
        send(h, json.dumps({"profiles": [{"id": "p"}], "next_cursor": "p"}).encode())

    url = hostile(answer)
    with Client(url, token="t" * 16) as client, pytest.raises(ClientError) as refused:
        list(client.iter_profiles())
    assert refused.value.code == "bad_response" and "does not advance" in refused.value.message
    assert len(pages) == 2  # the first page, and the one whose cursor repeated


def test_an_answer_past_the_byte_cap_is_refused_without_reading_it_all(hostile) -> None:
    chunk = b"x" * 2**20

    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(200 * len(chunk)))
        h.end_headers()
        try:
            for _ in range(200):
                h.wfile.write(chunk)
        except OSError:
            pass  # the client hung up, as it should

    url = hostile(answer)
    tracemalloc.start()
    try:
        client = Client(url, token="t" * 16, max_response_bytes=4 * 2**20)
        with client, pytest.raises(ClientError) as refused:
            client.health()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.code == "response_too_large"
    assert peak < 32 * 2**20  # not the 200 MiB the server offered


def _trickle(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", "100")
    h.end_headers()
    try:
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.3)
    except OSError:
        pass


def test_a_trickling_answer_ends_the_call_at_its_timeout(hostile) -> None:
    url = hostile(_trickle)
    began = time.monotonic()
    with Client(url, token="t" * 16, timeout=1.5) as client, pytest.raises(ClientError) as refused:
        client.health()
    assert refused.value.code == "timeout" and time.monotonic() - began < 3.5  # not 30 s of trickle


def test_a_trickling_answer_ends_the_async_call_at_its_timeout(hostile) -> None:
    url = hostile(_trickle)

    async def call() -> None:
        async with AsyncClient(url, token="t" * 16, timeout=1.5) as client:
            await client.health()

    began = time.monotonic()
    with pytest.raises(ClientError) as refused:
        asyncio.run(call())
    assert refused.value.code == "timeout" and time.monotonic() - began < 3.0


def test_an_answer_that_is_not_json_is_an_error_line_and_exit_2(hostile, capsys) -> None:
    url = hostile(lambda h: send(h, b"<html><body>a proxy's page</body></html>", "text/html"))
    with Client(url, token="t" * 16) as client, pytest.raises(ClientError) as refused:
        client.health()
    assert refused.value.code == "bad_response" and "text/html" in refused.value.message
    assert main(["profiles", "list", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad_response:") and "Traceback" not in err


class DropFirstAnswer(httpx.HTTPTransport):
    """Delivers every request, but loses the first POST's answer (the connection drops after the
    server took the request), as a flaky network between client and server would."""

    def __init__(self) -> None:
        super().__init__()
        self.posts = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST":
            self.posts += 1
            if self.posts == 1:
                response.read()
                raise httpx.RemoteProtocolError("server disconnected without sending a response")
        return response


def test_a_training_post_resent_after_a_dropped_answer_queues_one_job(serve, tmp_path) -> None:
    admin = "hostile-admin-token-5e1c0d"
    url = serve(
        "hostile-train",
        {
            "XPEFT_ADMIN_TOKEN": admin,
            "XPEFT_SQLITE_PATH": str(tmp_path / "s.sqlite3"),
            "XPEFT_EMBEDDED_TRAINER": "false",
        },
    ).url
    examples = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)]
    transport = DropFirstAnswer()
    with Client(url, token=admin, transport=transport) as client:
        job = client.train("h-1", examples, epochs=1)
        assert transport.posts == 2  # resent once
        listed = client.jobs()["jobs"]
        assert [j["id"] for j in listed] == [job.id]  # one job, the first one
        again = client.train("h-1", examples, epochs=1)  # a new call: a new key, a new job
        assert again.id != job.id
