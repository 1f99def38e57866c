"""Auth: the admin token for writes, the API token for reads, per-tenant predict tokens limited to
profile-id prefixes (one tenant cannot call another's profile), constant-time comparison, and no
token in any log line. Each refusal is tested over HTTP against server ``main``.
"""

from __future__ import annotations

import argparse
import hmac
import json

import httpx
import pytest
from starlette.requests import Request

from xpeft.adapters.errors import XPeftError
from xpeft.cli.serve import build_settings
from xpeft.server import auth
from xpeft.server.auth import Authorizer
from xpeft.server.errors import ApiError
from xpeft.server.settings import Settings

from .conftest import ACME, ADMIN, API, BETA, TENANTS, bearer

WRONG = "rel-wrong-token-0d0d0d"


@pytest.fixture(scope="module")
def main(fleet, make_profile) -> httpx.Client:
    with httpx.Client(base_url=fleet.main.url, timeout=30) as client:
        for profile_id in ("acme-1", "beta-1", "shared-beta-1", "acmeX-1", "other-1"):
            assert client.put(
                f"/profiles/{profile_id}", content=make_profile(5), headers=bearer(ADMIN)
            ).is_success
        yield client


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def predict(client: httpx.Client, profile_id: str, headers: dict | None = None) -> httpx.Response:
    return client.post(f"/profiles/{profile_id}/predict", json={"inputs": ["hello"]}, headers=headers)


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_writes_need_the_admin_token(main, make_profile, method) -> None:
    body = {"content": make_profile(6)} if method == "PUT" else {}
    for headers, status, code in [
        ({}, 401, "unauthorized"),
        ({"Authorization": f"Basic {ADMIN}"}, 401, "unauthorized"),
        ({"Authorization": "Bearer"}, 401, "unauthorized"),
        (bearer(WRONG), 403, "forbidden"),
        (bearer(API), 403, "forbidden"),
        (bearer(ACME), 403, "forbidden"),
        (bearer(ADMIN + "x"), 403, "forbidden"),
        (bearer(ADMIN[:-1]), 403, "forbidden"),
    ]:
        refused(main.request(method, "/profiles/acme-1", headers=headers, **body), status, code)
    # nothing changed: acme-1 is still there, at its version
    version = main.get("/profiles/acme-1", headers=bearer(API)).json()["version"]
    assert main.request(method, "/profiles/acme-1", headers=bearer(ADMIN), **body).is_success
    if method == "PUT":
        assert main.get("/profiles/acme-1", headers=bearer(API)).json()["version"] > version
    else:
        assert main.put("/profiles/acme-1", content=make_profile(5), headers=bearer(ADMIN)).status_code == 201


def test_a_tenant_token_reaches_its_own_profiles_only(main) -> None:
    assert predict(main, "acme-1", bearer(ACME)).status_code == 200
    assert main.get("/profiles/acme-1", headers=bearer(ACME)).json()["id"] == "acme-1"
    assert predict(main, "beta-1", bearer(BETA)).status_code == 200
    assert predict(main, "shared-beta-1", bearer(BETA)).status_code == 200  # a second prefix
    # another tenant's profile, whether it exists or not: the same 403 (no existence oracle)
    for token, profile_id in [
        (ACME, "beta-1"),
        (ACME, "shared-beta-1"),
        (ACME, "beta-missing"),
        (BETA, "acme-1"),
        (ACME, "other-1"),
        (ACME, "acmeX-1"),
        (BETA, "other-1"),
    ]:
        refused(predict(main, profile_id, bearer(token)), 403, "forbidden")
        refused(main.get(f"/profiles/{profile_id}", headers=bearer(token)), 403, "forbidden")
    # the list would show other tenants' ids; writes are the admin's
    refused(main.get("/profiles", headers=bearer(ACME)), 403, "forbidden")
    refused(main.put("/profiles/acme-2", content=b"x", headers=bearer(ACME)), 403, "forbidden")
    refused(main.delete("/profiles/acme-1", headers=bearer(ACME)), 403, "forbidden")
    # a tenant token is not a prefix of a longer one, nor with trailing junk
    refused(predict(main, "acme-1", bearer(ACME[:-1])), 403, "forbidden")
    refused(predict(main, "acme-1", bearer(ACME + "0")), 403, "forbidden")


def test_reads_need_a_token_once_tenants_exist(main) -> None:
    for path in ("/profiles", "/profiles/acme-1"):
        refused(main.get(path), 401, "unauthorized")
        refused(main.get(path, headers=bearer(WRONG)), 403, "forbidden")
        assert main.get(path, headers=bearer(API)).status_code == 200
        assert main.get(path, headers=bearer(ADMIN)).status_code == 200
    refused(predict(main, "acme-1"), 401, "unauthorized")
    refused(predict(main, "acme-1", bearer(WRONG)), 403, "forbidden")
    assert predict(main, "other-1", bearer(API)).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # probes stay open
        assert main.get(path).status_code == 200


def test_no_token_is_ever_logged(fleet, main) -> None:
    """Server main logs at debug level with the access log on; it has seen every token by now."""
    predict(main, "acme-1", bearer(ACME))
    predict(main, "beta-1", bearer(ACME))
    main.get("/profiles", headers=bearer(WRONG))
    log = fleet.main.log_text()
    assert "/profiles/acme-1/predict" in log and "DEBUG" in log  # the log is written, verbosely
    for secret in [ADMIN, API, WRONG, *TENANTS, json.dumps(TENANTS)]:
        assert secret not in log
    for fragment in ("admin-token", "api-token", "acme-token", "beta-token", "wrong-token"):
        assert fragment not in log  # no part of any token either


def _request(token: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_tokens_are_compared_in_constant_time(monkeypatch) -> None:
    """Every configured admin/API token is compared with hmac.compare_digest, with no early exit;
    a tenant token is found by a keyed hash, then confirmed with compare_digest too."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    authorizer = Authorizer(Settings(admin_token=ADMIN, api_token=API, predict_tokens=json.dumps(TENANTS)))

    authorizer.check_profile(_request(ADMIN), "x")  # matches the first secret, still compares the second
    assert [b for _, b in calls] == [ADMIN.encode(), API.encode()]
    calls.clear()
    with pytest.raises(ApiError) as refusal:
        authorizer.check_profile(_request(WRONG), "acme-1")
    assert refusal.value.status == 403 and len(calls) == 2  # both compared, then the tenant lookup misses
    calls.clear()
    authorizer.check_profile(_request(ACME), "acme-1")
    assert calls[-1] == (ACME.encode(), ACME.encode())  # the tenant token itself, confirmed in constant time
    calls.clear()
    with pytest.raises(ApiError):
        authorizer.check_admin(_request(API))
    assert calls == [(API.encode(), ADMIN.encode())]


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": ["acme-"]}'}, "need XPEFT_ADMIN_TOKEN"),
        (
            {
                "XPEFT_ADMIN_TOKEN": ADMIN,
                "XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": "bad prefix"}',
            },
            "token 1 needs",
        ),
        (
            {"XPEFT_ADMIN_TOKEN": ADMIN, "XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": []}'},
            "token 1 needs",
        ),
        (
            {
                "XPEFT_ADMIN_TOKEN": ADMIN,
                "XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": ["ok-"], "tok secret": ["b-"]}',
            },
            "token 2",
        ),
        ({"XPEFT_ADMIN_TOKEN": ADMIN, "XPEFT_PREDICT_TOKENS": '["tok-secret-1-long-enough"]'}, "JSON object"),
        ({"XPEFT_ADMIN_TOKEN": ADMIN, "XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": ['}, "not JSON"),
        (
            {
                "XPEFT_ADMIN_TOKEN": "tok-secret-1-long-enough",
                "XPEFT_PREDICT_TOKENS": '{"tok-secret-1-long-enough": ["a-"]}',
            },
            "must differ",
        ),
    ],
)
def test_a_bad_token_table_stops_serve_without_showing_a_token(monkeypatch, tmp_path, env, needle) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(bank=str(tmp_path / "bank.safetensors"))
    with pytest.raises(XPeftError) as error:
        build_settings(args)
    assert error.value.code == "bad_argument" and needle in error.value.message
    assert "secret" not in str(error.value)


def test_predict_tokens_from_a_file(tmp_path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tok-file-1-long-enough": ["gamma-"], ACME: ["acme-", "acme2-"]}))
    settings = Settings(
        admin_token=ADMIN, predict_tokens=json.dumps({ACME: ["acme-"]}), predict_tokens_file=path
    )
    assert settings.tenant_prefixes() == {
        ACME: ("acme-", "acme2-"),
        "tok-file-1-long-enough": ("gamma-",),
    }  # the file wins
    assert ACME not in repr(settings) and "tok-file-1-long-enough" not in repr(settings)
