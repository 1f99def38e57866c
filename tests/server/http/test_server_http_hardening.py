"""Hardening: each case an adversarial review found, with the fix it proves (see SECURITY.md).

Ids in client URLs, damaged store records, the store's address in /readyz, protected mode without
an admin token, token length and ``*_FILE`` secrets, overlapping tenant prefixes, the SQLite file's
mode, an unreadable bank, and what git must ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from starlette.requests import Request

from testsupport.processes import free_port, redis_answers
from xpeft.adapters.errors import XPeftError
from xpeft.client import Client, ClientError, profile_path
from xpeft.engine.runtime import MultiProfileModel
from xpeft.server.app import create_app
from xpeft.server.auth import Authorizer, check_exposure
from xpeft.server.errors import ApiError
from xpeft.server.middleware import redact_query
from xpeft.server.settings import Settings
from xpeft.server.stores import open_store
from xpeft.server.stores.redis_store import RedisStore
from xpeft.server.stores.sqlite_store import SQLiteStore

ROOT = Path(__file__).resolve().parents[3]
LONG = "a-token-of-sixteen-plus"
ADMIN = "admin-token-for-tests"  # tests/conftest.py: the token of servers a and b


# -- ids in URLs ----------------------------------------------------------------------------
def test_a_dotted_id_cannot_reach_another_profile(cluster, admin_headers, profile_bytes) -> None:
    assert (
        httpx.URL("http://x/profiles/acme-mine/../beta-victim").path == "/profiles/beta-victim"
    )  # the attack
    with Client(cluster.a.url, token=ADMIN) as client:
        client.upload("beta-victim", profile_bytes(11))
        for bad in ("acme-mine/../beta-victim", "../beta-victim", "acme-mine/..%2Fbeta-victim", "x?y", ""):
            for call in (client.delete, client.get, lambda i: client.predict(i, ["x"])):
                with pytest.raises(ClientError) as err:
                    call(bad)
                assert err.value.code == "invalid_profile_id" and err.value.status == 0  # nothing was sent
        with pytest.raises(ClientError) as err:
            client.upload("acme-mine/../beta-victim", profile_bytes(12))
        assert err.value.code == "invalid_profile_id"
        assert client.get("beta-victim")["version"] > 0  # still there, unchanged
    assert profile_path("a.b_c-1", "/predict") == "/profiles/a.b_c-1/predict"


# -- damaged records ------------------------------------------------------------------------
def test_a_damaged_record_is_a_typed_error_and_the_listing_still_works(
    cluster, redis_url, redis_prefix, admin_headers, profile_bytes
) -> None:
    with httpx.Client(base_url=cluster.a.url, headers=admin_headers, timeout=30) as client:
        for name in ("dmg-1", "dmg-2", "dmg-3"):
            assert client.put(f"/profiles/{name}", content=profile_bytes(13)).is_success
        store = redis.Redis.from_url(redis_url)
        store.hset(f"{{{redis_prefix}}}:profile:dmg-2", "meta", b"{not json")
        store.close()
        answer = client.get("/profiles/dmg-2")
        assert answer.status_code == 409 and answer.json()["error"] == "corrupt_record"
        assert "dmg-2" in answer.json()["message"]
        ids = [
            p["id"]
            for p in client.get("/profiles", params={"cursor": "dmg-0", "limit": 1000}).json()["profiles"]
        ]
        assert "dmg-1" in ids and "dmg-3" in ids and "dmg-2" not in ids
        assert client.get("/profiles/dmg-3").status_code == 200


def test_sqlite_leaves_a_damaged_record_out_of_its_pages(tmp_path) -> None:
    asyncio.run(_sqlite_pages(tmp_path))


async def _sqlite_pages(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "p.sqlite3")
    try:
        for name in ("a", "b", "c", "d"):
            await store.put(name, b"x", {"n": name})
        with contextlib.closing(sqlite3.connect(tmp_path / "p.sqlite3")) as db, db:
            db.execute("UPDATE profiles SET meta = '[1, 2]' WHERE id = 'b'")  # JSON, but not an object
        first, cursor = await store.list(None, 2)
        assert [r.id for r in first] == ["a"] and cursor == "b"  # the cursor still moves past it
        second, cursor = await store.list(cursor, 2)
        assert [r.id for r in second] == ["c", "d"] and cursor is None
    finally:
        await store.close()


# -- the store's address --------------------------------------------------------------------
def test_readyz_does_not_tell_callers_where_the_store_is(encoder, bank, tmp_path) -> None:
    port = free_port()  # nothing listens there
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", store_timeout_s=0.3)
    with TestClient(create_app(settings, model=MultiProfileModel(encoder, bank))) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json()["error"] == "store_unavailable"
    assert str(port) not in answer.text and "127.0.0.1" not in answer.text and "redis://" not in answer.text


# -- protected mode -------------------------------------------------------------------------
def test_without_an_admin_token_writes_are_open_on_loopback_only(capsys) -> None:
    check_exposure(Settings(host="127.0.0.1", log_level="error"))
    assert "NO ADMIN TOKEN" in capsys.readouterr().err  # on stderr, whatever the log level
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.org"):
        with pytest.raises(XPeftError) as err:
            check_exposure(Settings(host=host))
        assert err.value.code == "open_writes_refused" and "XPEFT_ALLOW_OPEN_WRITES" in err.value.message
    check_exposure(Settings(host="0.0.0.0", allow_open_writes=True))
    assert "ANYONE" in capsys.readouterr().err
    check_exposure(Settings(host="0.0.0.0", admin_token=LONG))  # a token: nothing to say
    assert capsys.readouterr().err == ""


def _request(client: str) -> Request:
    return Request({"type": "http", "method": "PUT", "headers": [], "client": (client, 1234)})


def test_without_an_admin_token_a_remote_client_may_not_write() -> None:
    """Even when the app is served some other way (a user's own uvicorn on 0.0.0.0)."""
    auth = Authorizer(Settings())
    auth.check_admin(_request("127.0.0.1"))
    auth.check_admin(_request("::1"))
    for remote in ("10.0.0.7", "192.168.1.1", "testclient"):
        with pytest.raises(ApiError) as err:
            auth.check_admin(_request(remote))
        assert err.value.status == 403 and "loopback" in err.value.message
    Authorizer(Settings(allow_open_writes=True)).check_admin(_request("10.0.0.7"))


def test_serve_refuses_a_public_address_without_an_admin_token(bank_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
    result = subprocess.run(
        [sys.executable, "-m", "xpeft.cli", "serve", "--bank", str(bank_path), "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "open_writes_refused" in result.stderr and "XPEFT_ADMIN_TOKEN" in result.stderr


# -- tokens and secrets ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["admin_token", "api_token"])
def test_short_tokens_are_refused(name) -> None:
    with pytest.raises(ValidationError, match="shorter than 16"):
        Settings(**{name: "x"})
    with pytest.raises(ValidationError, match="token 1 is shorter than 16"):
        Settings(admin_token=LONG, predict_tokens=json.dumps({"short": ["acme-"]}))


def test_every_secret_can_come_from_a_file(tmp_path) -> None:
    files = {}
    for name, value in [("admin", LONG + "-admin"), ("api", LONG + "-api"), ("redis", "redis-pass")]:
        files[name] = tmp_path / name
        files[name].write_text(value + "\n")  # as `echo` or an editor writes it
    settings = Settings(
        admin_token_file=files["admin"], api_token_file=files["api"], redis_password_file=files["redis"]
    )
    assert settings.admin_token.get_secret_value() == LONG + "-admin"
    assert settings.api_token.get_secret_value() == LONG + "-api"
    assert settings.redis_password.get_secret_value() == "redis-pass"
    assert "redis-pass" not in repr(settings) and LONG not in repr(settings)
    with pytest.raises(ValidationError, match="not both"):
        Settings(admin_token=LONG, admin_token_file=files["admin"])
    with pytest.raises(ValidationError, match="cannot read admin_token_file") as err:
        Settings(admin_token_file=tmp_path / "missing")
    files["admin"].write_text("short\n")
    with pytest.raises(ValidationError, match="shorter than 16") as err:
        Settings(admin_token_file=files["admin"])
    assert "short" not in str(err.value).replace("shorter", "")


def test_redis_password_is_sent_from_settings_not_the_url() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--requirepass",
            "pw-9f3c",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(f"redis://:pw-9f3c@127.0.0.1:{port}/0"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        asyncio.run(_ping_with_and_without_password(f"redis://127.0.0.1:{port}/0"))
    finally:
        proc.terminate()
        proc.wait(10)


async def _ping_with_and_without_password(url: str) -> None:
    with_password = RedisStore(url, "pw-test", timeout_s=1, password="pw-9f3c")
    await with_password.ping()
    await with_password.close()
    without = RedisStore(url, "pw-test", timeout_s=1)
    with pytest.raises(XPeftError) as err:
        await without.ping()
    assert err.value.code == "store_unavailable"
    await without.close()


def test_a_password_in_the_redis_url_is_flagged_without_being_logged(caplog) -> None:
    store = open_store(Settings(redis_url="redis://:pw-in-url-77@127.0.0.1:1/0"))
    asyncio.run(store.close())
    assert "XPEFT_REDIS_PASSWORD_FILE" in caplog.text and "pw-in-url-77" not in caplog.text


def test_overlapping_tenant_prefixes_are_refused() -> None:
    for table in (
        {"t" * 16: ["acme-"], "u" * 16: ["acme-eu-"]},
        {"t" * 16: ["ac", "acd"], "u" * 16: ["acz"]},  # nested under a prefix that is not a neighbour
        {"t" * 16: ["same-", "x-"], "u" * 16: ["same-"]},
    ):
        with pytest.raises(ValidationError, match="overlap"):
            Settings(admin_token=LONG, predict_tokens=json.dumps(table))
    ok = Settings(
        admin_token=LONG, predict_tokens=json.dumps({"t" * 16: ["acme-", "acme-eu-"], "u" * 16: ["b-"]})
    )
    assert len(ok.tenant_prefixes()) == 2  # one tenant's own prefixes may nest
    rotating = {"t" * 16: ["acme-", "b-"], "u" * 16: ["b-", "acme-"]}  # one tenant, old and new token
    assert len(Settings(admin_token=LONG, predict_tokens=json.dumps(rotating)).tenant_prefixes()) == 2


def test_query_values_other_than_paging_are_redacted() -> None:
    assert redact_query("token=abc&limit=5&cursor=x&access_token=zz&abc") == "***&limit=5&cursor=x&***&***"


# -- files on disk --------------------------------------------------------------------------
def test_a_new_sqlite_store_is_readable_by_its_owner_only(tmp_path) -> None:
    async def write() -> None:
        store = SQLiteStore(tmp_path / "new.sqlite3")
        await store.put("p", b"x", {})
        await store.close()

    asyncio.run(write())
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_an_unreadable_bank_says_permission_denied(bank_path) -> None:
    """The image's failure: a bank written 0600 by root, served by uid 10001."""
    folder = Path(tempfile.mkdtemp(prefix="xpeft-bank-"))  # pytest's own folders are 0700
    folder.chmod(0o777)  # nobody may create the store file next to the bank
    bank = folder / "bank.safetensors"
    shutil.copy(bank_path, bank)
    bank.chmod(0o600)
    command = [sys.executable, "-m", "xpeft.cli", "serve", "--bank", str(bank)]
    if os.getuid() == 0:  # root reads anything: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        probe = subprocess.run([*command[:4], sys.executable, "-c", "import xpeft.cli"], capture_output=True)
        if probe.returncode != 0:  # e.g. a checkout under a 0700 folder: the next test covers the check
            pytest.skip("uid nobody cannot run this checkout's interpreter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
    env["XPEFT_SQLITE_PATH"] = str(folder / "unused.sqlite3")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "bank_unreadable" in result.stderr and "permission denied" in result.stderr
    assert "No such file" not in result.stderr
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root")
def test_check_readable_as_another_user(bank_path) -> None:
    """The same refusal, checked in a forked child that drops to uid nobody (works wherever the
    checkout lives, since the child already has the code in memory)."""
    from xpeft.adapters.errors import XPeftError
    from xpeft.server.model import check_readable

    folder = Path(tempfile.mkdtemp(prefix="xpeft-bank-"))
    folder.chmod(0o755)
    bank = folder / "bank.safetensors"
    shutil.copy(bank_path, bank)
    bank.chmod(0o600)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = "no error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            check_readable(bank)
        except XPeftError as exc:
            code = f"{exc.code}: {exc.message}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            code = repr(exc)
        os.write(write, code.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    got = os.read(read, 4096).decode()
    os.close(read)
    shutil.rmtree(folder, ignore_errors=True)
    assert got.startswith("bank_unreadable: ") and "permission denied" in got, got
    bank_ok = folder.parent / "missing.safetensors"
    with pytest.raises(XPeftError, match="no bank file"):
        check_readable(bank_ok)


def test_git_ignores_local_secrets_and_the_default_store() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (".env", "secrets/admin_token", "xpeft-profiles.sqlite3", "xpeft-profiles.sqlite3-wal"):
        result = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert result.returncode == 0, f"{path} is not ignored"
