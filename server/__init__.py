"""xpeft.server: the multi-profile HTTP service."""
