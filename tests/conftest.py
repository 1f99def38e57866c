"""Shared fixtures: the real MiniLM encoder and small seeded banks, loaded once per session; and,
for the server, client and CLI tests, a real Redis, real uvicorn processes on loopback and profile
bytes.

Redis: ``XPEFT_TEST_REDIS_URL`` when set, else 127.0.0.1:6379 when it answers, else a
``redis-server`` started here on a free port. Every session uses its own key prefix, so parallel
or earlier runs never collide, and deletes its keys at the end.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Tests never reach a model hub: a name that is not a local folder fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# In-process apps serve with the torch encoder, so served answers equal the offline model's
# (tests/engine/test_backends.py names the other backends outright).
os.environ.setdefault("XPEFT_BACKEND", "torch")

import pytest  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from testsupport.cluster import LocalCluster  # noqa: E402
from testsupport.processes import RedisServer, ServerProcess, redis_answers, running  # noqa: E402
from xpeft.adapters.bank import AdapterBank, create_random_bank  # noqa: E402
from xpeft.adapters.encoder import AdapterEncoder, load_encoder  # noqa: E402
from xpeft.adapters.fusion import FusedAdapters  # noqa: E402
from xpeft.engine.cache import FusedCache  # noqa: E402
from xpeft.profiles import format as xpm  # noqa: E402
from xpeft.profiles.synthetic import random_profile  # noqa: E402
from xpeft.training.data import Dataset  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def encoder() -> AdapterEncoder:
    return load_encoder("minilm", device="cpu")


@pytest.fixture(scope="session")
def bank(encoder: AdapterEncoder) -> AdapterBank:
    """A small random bank (N=20) for the MiniLM: quick to fuse, same code as N=100."""
    return create_random_bank(
        encoder.num_layers,
        encoder.hidden_size,
        encoder.model_id,
        num_adapters=20,
        seed=0,
        model_name="minilm",
    )


@pytest.fixture(scope="session")
def frozen_training() -> dict[str, float | int]:
    """Training options under which nothing learns (every rate zero, one short epoch): the profile
    a run writes is the one it started from."""
    return {"lr_scores": 0.0, "lr_head": 0.0, "lr_gain": 0.0, "epochs": 1, "batch_size": 16, "max_length": 16}


@pytest.fixture(scope="session")
def separable() -> Dataset:
    """A small, clearly separable sentiment set the tests write themselves."""
    good = ["wonderful", "excellent", "delightful", "brilliant", "lovely", "superb", "great", "charming"]
    bad = ["awful", "terrible", "dreadful", "horrible", "boring", "dismal", "lousy", "painful"]
    frames = ["the film was {}", "a {} experience", "what a {} meal", "this book is {}"]
    inputs, labels = [], []
    for frame in frames:
        for g, b in zip(good, bad, strict=True):
            inputs += [frame.format(g), frame.format(b)]
            labels += ["pos", "neg"]
    return Dataset(inputs, labels)


ADMIN = "admin-token-for-tests"
READER = "reader-token-for-tests"


def new_redis_server(aof: bool = False) -> RedisServer:
    """A private redis-server (``testsupport.processes``), or a skip where none is installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (CI installs it)")
    return RedisServer(aof=aof)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("XPEFT_TEST_REDIS_URL")
    if url:
        yield url
        return
    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    server = new_redis_server()
    yield server.url
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster on loopback for the session: 3 masters with a replica each (so the
    cluster store's ``WAIT 1`` is met). Tests that kill nodes start their own."""
    try:
        started = LocalCluster(replicas=1)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        pytest.skip(f"a local Redis Cluster could not start: {exc}")
    yield started
    started.close()


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for this session; every key under it is deleted at the end."""
    prefix = f"xpeft-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def bank_path(bank: AdapterBank, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bank.save(tmp_path_factory.mktemp("bank") / "bank.safetensors")


@pytest.fixture(scope="session")
def profile_bytes(bank: AdapterBank):
    """``profile_bytes(seed, kind="hard", labels=None)``: a random valid profile's .xpm bytes."""

    def make(seed: int, kind: str = "hard", labels: list[str] | None = None) -> bytes:
        return xpm.encode(random_profile(bank, kind, seed=seed, labels=labels))

    return make


# -- server processes -----------------------------------------------------------------------
@dataclass
class Cluster:
    """The servers every HTTP test shares (started together: startup is the slow part)."""

    a: ServerProcess  # Redis, admin token
    b: ServerProcess  # a second replica on the same Redis and prefix
    c: ServerProcess  # embedded SQLite store, API token for reads, small limits
    d: ServerProcess  # a private Redis that a test stops and restarts
    d_redis: RedisServer
    sqlite_path: Path


@pytest.fixture(scope="session")
def cluster(
    redis_url: str, redis_prefix: str, bank_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("server-logs")
    shared = {
        "XPEFT_REDIS_URL": redis_url,
        "XPEFT_REDIS_PREFIX": redis_prefix,
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_MAX_WAIT_MS": "10",
    }
    sqlite_path = tmp_path_factory.mktemp("sqlite") / "profiles.sqlite3"
    d_redis = new_redis_server()
    servers = [
        ServerProcess("a", dict(shared), bank_path, logs / "a.log"),
        ServerProcess("b", dict(shared), bank_path, logs / "b.log"),
        ServerProcess(
            "c",
            {
                "XPEFT_SQLITE_PATH": str(sqlite_path),
                "XPEFT_ADMIN_TOKEN": ADMIN,
                "XPEFT_API_TOKEN": READER,
                "XPEFT_MAX_INPUTS": "4",
                "XPEFT_MAX_TEXT_CHARS": "300",
                "XPEFT_MAX_PROFILE_BYTES": "65536",
                "XPEFT_MAX_REQUEST_BYTES": "4096",
                "XPEFT_MAX_QUEUE": "2",
                "XPEFT_MAX_BATCH_SIZE": "4",
                "XPEFT_MAX_WAIT_MS": "0",
                "XPEFT_MAX_LIST_LIMIT": "50",
                "XPEFT_LOG_LEVEL": "info",
            },
            bank_path,
            logs / "c.log",
        ),
        ServerProcess(
            "d", {"XPEFT_REDIS_URL": d_redis.url, "XPEFT_STORE_TIMEOUT_S": "0.5"}, bank_path, logs / "d.log"
        ),
    ]
    try:
        with running(*servers):
            yield Cluster(*servers, d_redis=d_redis, sqlite_path=sqlite_path)
    finally:
        d_redis.close()


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="session")
def reader_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}


def keep_fused(cache: FusedCache, key: tuple[str, int], fused: FusedAdapters) -> bool:
    """What a batch of one cold profile does, without a model: reserve its slot, write its weights
    there (the model's fill), commit, release. True when the cache now holds it."""
    L, _, d, r = fused.down.shape
    if cache.attach(L, d, r, fused.down.device, fused.down.dtype) is None:
        return False
    with cache.reserve([key]) as held:
        slot = held.slots[0]
        if slot is None:
            return False
        if not held.cold:
            return True
        cache.pool.write([slot], fused)  # type: ignore[union-attr]
        return held.commit(0)


@pytest.fixture(scope="session")
def keep() -> Callable[[FusedCache, tuple[str, int], FusedAdapters], bool]:
    """:func:`keep_fused`, for tests of the fused-weight cache and of the caches around it."""
    return keep_fused


@pytest.fixture(scope="module")
def serve(bank_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """``serve(name, env)``: a real ``xpeft serve`` on loopback with ``env``'s ``XPEFT_*`` settings,
    started and ready; every server a module started stops at its end. For tests that need settings
    no shared server has."""
    logs = tmp_path_factory.mktemp("serve-logs")
    started: list[ServerProcess] = []

    def start(name: str, env: dict[str, str]) -> ServerProcess:
        server = ServerProcess(name, dict(env), bank_path, logs / f"{name}.log")
        started.append(server)
        server.start()
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
