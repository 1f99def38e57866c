"""xpeft.engine: the serving engine: runtime, slot pool, model worker and micro-batcher; no HTTP."""
