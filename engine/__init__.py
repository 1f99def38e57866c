"""xpeft.engine: the serving engine: runtime, encoder backends, slot pool, model worker and
micro-batcher; no HTTP."""
