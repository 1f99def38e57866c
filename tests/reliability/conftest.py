"""Fixtures for the reliability tests: a small fleet of real ``xpeft serve`` processes, each set up
for the faults one group of tests makes, started together (startup is the slow part).

- ``main``: the shared test Redis under a fresh prefix; admin, API and two tenants' predict tokens;
  debug logging with the access log (to show that no token is ever logged); modest limits.
- ``replica``: a second replica on the same Redis and prefix, with a small queue and in-flight limit
  (the overload tests), and the other side of the concurrent-update test.
- ``outage``: its own redis-server with AOF on (as docker-compose.yml), which a test hangs and kills.
- ``drain``: the embedded SQLite store; a test sends it SIGTERM.
- ``limits``: tiny time limits (a 50 ms request deadline, 1 s body and header deadlines) and small sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testsupport.processes import (  # noqa: F401 - the tests import bearer from here
    RedisServer,
    ServerProcess,
    bearer,
    drop_prefix,
    redis_answers,
    running,
)
from xpeft.adapters.bank import AdapterBank
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile

ADMIN = "rel-admin-token-7c1f0a"
API = "rel-api-token-52be91"
TENANTS = {"rel-acme-token-e4d2c8": ["acme-"], "rel-beta-token-9b3a17": ["beta-", "shared-beta-"]}
ACME, BETA = list(TENANTS)


@dataclass
class Fleet:
    main: ServerProcess
    replica: ServerProcess
    outage: ServerProcess
    drain: ServerProcess
    limits: ServerProcess
    outage_redis: RedisServer
    redis_url: str  # main's and replica's store
    prefix: str


@pytest.fixture(scope="session")
def rel_redis_url() -> Iterator[str]:
    """``XPEFT_TEST_REDIS_URL``, else 127.0.0.1:6379 when it answers, else a private redis-server."""
    url = os.environ.get("XPEFT_TEST_REDIS_URL")
    if url or redis_answers("redis://127.0.0.1:6379/0"):
        yield url or "redis://127.0.0.1:6379/0"
        return
    server = private_redis()
    yield server.url
    server.close()


def private_redis(aof: bool = False) -> RedisServer:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it)")
    return RedisServer(aof=aof)


@pytest.fixture(scope="session")
def rel_bank_path(bank: AdapterBank, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bank.save(tmp_path_factory.mktemp("rel-bank") / "bank.safetensors")


@pytest.fixture(scope="session")
def make_profile(bank: AdapterBank):
    """``make_profile(seed, labels)``: the .xpm bytes of a random valid hard profile."""

    def make(seed: int, labels: list[str] | None = None) -> bytes:
        return xpm.encode(random_profile(bank, "hard", seed=seed, labels=labels))

    return make


@pytest.fixture(scope="session")
def fleet(
    rel_redis_url: str, rel_bank_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("rel-logs")
    data = tmp_path_factory.mktemp("rel-data")
    prefix = f"xpeft-rel-{uuid.uuid4().hex[:12]}"
    outage_redis = private_redis(aof=True)
    shared = {
        "XPEFT_REDIS_URL": rel_redis_url,
        "XPEFT_REDIS_PREFIX": prefix,
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_API_TOKEN": API,
    }
    servers = {
        "main": {
            **shared,
            "XPEFT_PREDICT_TOKENS": json.dumps(TENANTS),
            "XPEFT_LOG_LEVEL": "debug",
            "XPEFT_ACCESS_LOG": "true",
            "XPEFT_MAX_INPUTS": "8",
            "XPEFT_MAX_TEXT_CHARS": "2048",
            "XPEFT_MAX_PROFILE_BYTES": "65536",
            "XPEFT_MAX_REQUEST_BYTES": "262144",
            "XPEFT_MAX_WAIT_MS": "2",
        },
        "replica": {
            **shared,
            "XPEFT_MAX_QUEUE": "8",
            "XPEFT_MAX_IN_FLIGHT": "12",
            "XPEFT_MAX_BATCH_SIZE": "8",
            "XPEFT_MAX_WAIT_MS": "2",
            "XPEFT_ACCESS_LOG": "false",
        },
        "outage": {
            "XPEFT_REDIS_URL": outage_redis.url,
            "XPEFT_REDIS_PREFIX": "outage",
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_STORE_TIMEOUT_S": "0.5",
            "XPEFT_REQUEST_TIMEOUT_S": "3",
            "XPEFT_VERSION_CHECK_S": "0.5",
            "XPEFT_ACCESS_LOG": "false",
        },
        "drain": {
            "XPEFT_SQLITE_PATH": str(data / "drain.sqlite3"),
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_MAX_BATCH_SIZE": "2",
            "XPEFT_MAX_WAIT_MS": "0",
            "XPEFT_DRAIN_TIMEOUT_S": "60",
            "XPEFT_DRAIN_DELAY_S": "0.5",
            "XPEFT_LOG_LEVEL": "info",
            "XPEFT_ACCESS_LOG": "false",
        },
        "limits": {
            "XPEFT_SQLITE_PATH": str(data / "limits.sqlite3"),
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_REQUEST_TIMEOUT_S": "0.05",
            "XPEFT_MAX_WAIT_MS": "300",
            "XPEFT_BODY_TIMEOUT_S": "1",
            "XPEFT_HEADER_TIMEOUT_S": "1",
            "XPEFT_MAX_INPUTS": "4",
            "XPEFT_MAX_TEXT_CHARS": "300",
            "XPEFT_MAX_REQUEST_BYTES": "4096",
            "XPEFT_MAX_PROFILE_BYTES": "65536",
        },
    }
    procs = {
        name: ServerProcess(name, env, rel_bank_path, logs / f"{name}.log") for name, env in servers.items()
    }
    try:
        with running(*procs.values()):  # at the end all drain at once, then each is waited for
            yield Fleet(**procs, outage_redis=outage_redis, redis_url=rel_redis_url, prefix=prefix)
    finally:
        outage_redis.close()
        drop_prefix(rel_redis_url, "{" + prefix + "}")
