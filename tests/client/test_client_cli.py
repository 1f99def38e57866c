"""The Python client and the ``xpeft upload`` / ``predict --url`` / ``profiles`` / ``serve`` commands."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from xpeft.cli.main import main
from xpeft.client import Client, ClientError
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_client_round_trip(cluster, profile_bytes, encoder, bank, admin_headers) -> None:
    token = admin_headers["Authorization"].split(" ", 1)[1]
    data = profile_bytes(21, labels=["bad", "good"])
    with Client(cluster.a.url, token=token) as client:
        meta = client.upload("client-1", data)
        assert meta["id"] == "client-1" and meta["labels"] == ["bad", "good"]
        assert client.get("client-1")["version"] == meta["version"]
        assert client.health()["status"] == "ok" and client.ready()["status"] == "ready"
        result = client.predict("client-1", ["a fine film", ("premise", "hypothesis")])
        expected = MultiProfileModel(encoder, bank).predict(
            xpm.decode(data, bank), ["a fine film", ("premise", "hypothesis")]
        )
        assert [p["label"] for p in result["predictions"]] == [e.label for e in expected]
        for i in range(3):
            client.upload(f"client-page-{i}", profile_bytes(30 + i))
        ids = [p["id"] for p in client.iter_profiles(page_size=2)]
        assert ids == sorted(ids) and {"client-1", "client-page-0", "client-page-2"} <= set(ids)
        assert client.delete("client-1")["deleted"] is True
        with pytest.raises(ClientError) as err:
            client.get("client-1")
        assert (err.value.code, err.value.status) == ("profile_not_found", 404)
        with pytest.raises(ClientError) as err:
            client.upload("client-2", data[:30])
        assert (err.value.code, err.value.status, err.value.body["detail"]) == (
            "invalid_profile",
            422,
            "truncated",
        )
    with Client(cluster.a.url) as anonymous, pytest.raises(ClientError) as err:
        anonymous.upload("client-3", data)
    assert err.value.code == "unauthorized"
    with Client(closed_port_url(), timeout=2) as client, pytest.raises(ClientError) as err:
        client.health()
    assert err.value.code == "connection_error"


def test_cli_upload_as_a_process_then_predict(
    cluster, profile_bytes, tmp_path, encoder, bank, admin_headers, capsys
) -> None:
    token = admin_headers["Authorization"].split(" ", 1)[1]
    path = tmp_path / "p.xpm"
    path.write_bytes(profile_bytes(41, labels=["sad", "happy"]))
    upload = subprocess.run(
        [
            sys.executable,
            "-m",
            "xpeft.cli",
            "upload",
            str(path),
            "--id",
            "cli-1",
            "--url",
            cluster.a.url,
            "--token",
            token,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert upload.returncode == 0, upload.stderr
    assert json.loads(upload.stdout)["id"] == "cli-1" and json.loads(upload.stdout)["version"] >= 1

    texts = ["what a joy", "premise ||| hypothesis"]
    assert main(["predict", "--url", cluster.a.url, "--id", "cli-1", "--pair-sep", "|||", *texts]) == 0
    served = json.loads(capsys.readouterr().out)
    expected = MultiProfileModel(encoder, bank).predict(
        xpm.load(path, bank), ["what a joy", ("premise ", " hypothesis")]
    )
    assert [s["input"] for s in served] == texts
    assert [s["label"] for s in served] == [e.label for e in expected]
    assert served[0]["score"] == pytest.approx(expected[0].score, abs=1e-4)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["upload", "{file}", "--id", "cli-2", "--url", "{url}", "--token", "wrong"], "forbidden"),
        (["upload", "{file}", "--id", "cli-2", "--url", "{url}"], "unauthorized"),
        (["upload", "{missing}", "--id", "cli-2", "--url", "{url}"], "not_found"),
        (["predict", "--url", "{url}", "--id", "no-such-profile", "text"], "profile_not_found"),
        (["predict", "--url", "{url}", "text"], "bad_argument"),
        (["predict", "--url", "{closed}", "--id", "x", "text"], "connection_error"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    cluster, profile_bytes, tmp_path, capsys, monkeypatch, argv, code
) -> None:
    for name in ("XPEFT_TOKEN", "XPEFT_ADMIN_TOKEN", "XPEFT_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "p.xpm"
    path.write_bytes(profile_bytes(1))
    values = {
        "file": str(path),
        "missing": str(tmp_path / "missing.xpm"),
        "url": cluster.a.url,
        "closed": closed_port_url(),
    }
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {code}: ") and err.count("\n") == 1


@pytest.fixture
def root_logging() -> Iterator[None]:
    """``xpeft serve`` in this process configures the root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_refuses_bad_settings_before_listening(tmp_path, capsys, monkeypatch, root_logging) -> None:
    monkeypatch.delenv("XPEFT_BANK", raising=False)
    assert main(["serve"]) == 2
    assert "error: bad_argument: serve needs --bank" in capsys.readouterr().err
    assert main(["serve", "--bank", str(tmp_path / "nope.safetensors")]) == 2
    assert "error: bank_not_found" in capsys.readouterr().err
    assert main(["serve", "--bank", "x", "--port", "70000"]) == 2
    assert "error: bad_argument: port" in capsys.readouterr().err


def test_profiles_list_get_download_delete(
    cluster, profile_bytes, tmp_path, capsys, monkeypatch, admin_headers
) -> None:
    """The stored profiles of a server, from the command line; the admin token from its variable."""
    monkeypatch.setenv("XPEFT_ADMIN_TOKEN", admin_headers["Authorization"].removeprefix("Bearer "))
    url = cluster.a.url
    stored = {f"cli-stored-{i}": profile_bytes(70 + i, labels=[f"l{i}", "other"]) for i in range(3)}
    with Client(url) as client:
        versions = {pid: client.upload(pid, data)["version"] for pid, data in stored.items()}

    def cli(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("profiles", "list", "--url", url, "--page-size", "2")
    listed = json.loads(out)
    ids = [m["id"] for m in listed]
    assert code == 0 and set(stored) <= set(ids) and ids == sorted(ids)
    assert {m["id"]: m["version"] for m in listed if m["id"] in stored} == versions
    code, out, _ = cli("profiles", "get", "cli-stored-1", "--url", url)
    assert code == 0 and json.loads(out)["labels"] == ["l1", "other"]

    target = tmp_path / "backup.xpm"
    code, out, _ = cli("profiles", "download", "cli-stored-1", "--url", url, "--out", str(target))
    assert code == 0 and target.read_bytes() == stored["cli-stored-1"]
    assert json.loads(out) == {"id": "cli-stored-1", "out": str(target), "bytes": len(stored["cli-stored-1"])}
    code, _, err = cli("profiles", "download", "cli-stored-2", "--url", url, "--out", str(target))
    assert code == 2 and err.startswith("error: bad_argument: ") and "--force" in err
    assert target.read_bytes() == stored["cli-stored-1"]  # refused before any request: unchanged
    code, _, _ = cli("profiles", "download", "cli-stored-2", "--url", url, "--out", str(target), "--force")
    assert code == 0 and target.read_bytes() == stored["cli-stored-2"]
    missing = tmp_path / "missing.xpm"
    code, _, err = cli("profiles", "download", "no-such-profile", "--url", url, "--out", str(missing))
    assert code == 2 and err.startswith("error: profile_not_found: ") and not missing.exists()
    assert not list(tmp_path.glob(".*.part"))  # no half-written file left behind

    code, out, _ = cli("profiles", "delete", "cli-stored-0", "--url", url)
    assert code == 0 and json.loads(out)["deleted"] is True
    code, _, err = cli("profiles", "get", "cli-stored-0", "--url", url)
    assert code == 2 and err.startswith("error: profile_not_found: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, code",
    [
        (["profiles", "get", "bad/../id", "--url", "{url}"], "invalid_profile_id"),
        (["profiles", "download", "bad/../id", "--url", "{url}"], "invalid_profile_id"),
        (["profiles", "download", "p", "--url", "{url}", "--out", "{tmp}"], "bad_argument"),  # a folder
        (["profiles", "download", "p", "--url", "{url}", "--out", "{tmp}/no/such/dir/p.xpm"], "bad_argument"),
        (["profiles", "list", "--url", "{url}", "--page-size", "0"], "bad_argument"),
        (["profiles", "delete", "p"], "bad_argument"),  # --url is required
        (["profiles", "list", "--url", "{url}"], "connection_error"),
    ],
)
def test_profiles_commands_refuse_bad_arguments_before_any_request(tmp_path, capsys, argv, code) -> None:
    url = closed_port_url()  # nothing listens: a refusal that came from a request would be connection_error
    assert main([a.format(url=url, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {code}: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
