"""Profile stores: Redis when a URL is given, else the embedded SQLite file."""

from __future__ import annotations

from xpeft.server.settings import Settings
from xpeft.server.stores.base import ChangeEvent, ProfileRecord, ProfileStore, StoredProfile, StoreUnavailable

__all__ = ["ChangeEvent", "ProfileRecord", "ProfileStore", "StoreUnavailable", "StoredProfile", "open_store"]


def open_store(settings: Settings) -> ProfileStore:
    """The store the settings name. Redis connects lazily; SQLite opens (and may fail) now."""
    if settings.redis_url:
        from xpeft.server.stores.redis_store import RedisStore

        password = settings.redis_password.get_secret_value() if settings.redis_password else None
        return RedisStore(
            settings.redis_url, settings.redis_prefix, settings.store_timeout_s, password=password
        )
    from xpeft.server.stores.sqlite_store import SQLiteStore

    return SQLiteStore(settings.sqlite_path, timeout_s=settings.store_timeout_s)
