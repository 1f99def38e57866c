"""Profile stores: Redis when a URL is given, else the embedded SQLite file."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from xpeft.server.settings import Settings
from xpeft.server.stores.base import ChangeEvent, ProfileRecord, ProfileStore, StoredProfile, StoreUnavailable

log = logging.getLogger("xpeft.server")
__all__ = ["ChangeEvent", "ProfileRecord", "ProfileStore", "StoreUnavailable", "StoredProfile", "open_store"]


def open_store(settings: Settings) -> ProfileStore:
    """The store the settings name. Redis connects lazily; SQLite opens (and may fail) now."""
    if settings.redis_url:
        from xpeft.server.stores.redis_store import RedisStore

        if urlsplit(settings.redis_url).password:
            log.warning(
                "the Redis URL holds a password: a --redis-url flag shows it in process listings; "
                "put it in XPEFT_REDIS_PASSWORD_FILE instead"
            )
        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        if settings.redis_cluster:
            from xpeft.server.stores.redis_cluster_store import RedisClusterStore

            return RedisClusterStore(
                settings.redis_url,
                settings.redis_prefix,
                settings.store_timeout_s,
                password=password,
                wait_replicas=settings.redis_wait_replicas,
            )
        return RedisStore(
            settings.redis_url, settings.redis_prefix, settings.store_timeout_s, password=password
        )
    from xpeft.server.stores.sqlite_store import SQLiteStore

    return SQLiteStore(settings.sqlite_path, timeout_s=settings.store_timeout_s)
