"""The load test's configuration (everything that decides its numbers), its log and its plan."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bench.common.loadgen import PlannedRequest
from bench.common.runs import (
    profile_id,
    stderr_log,
)
from bench.common.stats import ZipfSampler


@dataclass
class Config:
    """Everything that decides the numbers; stored in the result JSON."""

    profiles: int = 10_000
    adapters: int = 100
    zipf_s: float = 1.1
    concurrency: int = 64
    texts_per_request: int = 1
    requests_per_pass: int = 1000
    pass_deadline_s: float = 45.0
    warm_rounds: int = 2
    memory_stages: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000])
    memory_requests: int = 500
    memory_fused_cache_mib: int = 64
    memory_sample_keys: int = 500
    seed: int = 0
    torch_threads: int = 1
    backend: str = "auto"  # the encoder backend of the servers (XPEFT_BACKEND) and of the offline model
    redis_url: str = "redis://127.0.0.1:6379/13"
    texts: str = ""
    server_env: dict[str, str] = field(
        default_factory=lambda: {"XPEFT_ACCESS_LOG": "false", "XPEFT_LOG_LEVEL": "warning"}
    )


QUICK = {
    "profiles": 200,
    "concurrency": 8,
    "requests_per_pass": 48,
    "pass_deadline_s": 10.0,
    "warm_rounds": 1,
    "memory_stages": [50, 200],
    "memory_requests": 24,
    "memory_sample_keys": 20,
}


log = stderr_log("load")


def make_plan(
    n_profiles: int, count: int, texts: list[str], config: Config, seed: int
) -> list[PlannedRequest]:
    """``count`` requests over profiles ``0..n-1`` drawn from Zipf(s); texts drawn uniformly (seeded)."""
    picks = ZipfSampler(n_profiles, config.zipf_s, seed).sample(count)
    rng = random.Random(seed)
    return [
        PlannedRequest(profile_id(int(i)), [rng.choice(texts) for _ in range(config.texts_per_request)])
        for i in picks
    ]
