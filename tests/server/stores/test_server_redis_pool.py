"""A burst of store reads beyond the connection pool's size waits for a connection, not a 503."""

from __future__ import annotations

import asyncio
import uuid

from xpeft.server.stores.redis_store import RedisStore


def test_burst_beyond_the_pool_is_served(redis_url, redis_prefix, profile_bytes) -> None:
    async def body() -> None:
        store = RedisStore(
            redis_url, f"{redis_prefix}-pool-{uuid.uuid4().hex[:6]}", timeout_s=5.0, max_connections=3
        )
        try:
            await store.put("p", profile_bytes(1), {})
            answers = await asyncio.gather(*(store.get("p") for _ in range(100)), return_exceptions=True)
            failures = [a for a in answers if isinstance(a, BaseException)]
            assert not failures, failures[:3]
            assert all(a is not None and a.data == profile_bytes(1) for a in answers)
            await store.delete("p")
        finally:
            await store.close()

    asyncio.run(body())
