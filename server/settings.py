"""Server settings: environment variables ``XPEFT_*``, overridden by ``xpeft serve`` flags.

One object carries every knob so that a replica's behaviour is fully described by its
environment (docker-compose sets nothing else).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All server settings; each field reads ``XPEFT_<FIELD NAME IN CAPITALS>``."""

    model_config = SettingsConfigDict(env_prefix="XPEFT_", extra="ignore")

    # what to serve
    bank: Path | None = Field(None, description="bank file (.safetensors); required")
    model: str | None = Field(None, description="encoder alias, folder or hub name; default: the bank's model_name, else minilm")
    device: str | None = Field(None, description="torch device; default CUDA when present, else CPU")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1, description="CPU threads of the model worker")

    # where to listen (used by `xpeft serve`)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # the profile store
    redis_url: str | None = Field(None, description="redis://... ; without it the embedded SQLite store serves")
    redis_prefix: str = Field("xpeft", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="key prefix (hash tag)")
    sqlite_path: Path = Field(Path("xpeft-profiles.sqlite3"), description="embedded store file")
    store_timeout_s: float = Field(2.0, gt=0, description="one store operation, then 503 store_unavailable")
    version_check_s: float = Field(1.0, gt=0, description="safety-net check for missed invalidation events")

    # micro-batching
    max_batch_size: int = Field(64, ge=1, description="rows (texts) per forward")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(1024, ge=1, description="queued requests before 503 overloaded")
    request_timeout_s: float = Field(30.0, gt=0, description="a predict waiting longer gets 504 timeout")

    # caches
    profile_cache_size: int = Field(10_000, ge=1, description="decoded profiles kept on the host")
    fused_cache_bytes: int = Field(256 * 2**20, ge=0, description="fused adapter weights kept on the device")

    # request limits
    max_profile_bytes: int = Field(4 * 2**20, ge=1, description="PUT body limit (413 too_large)")
    max_request_bytes: int = Field(2**20, ge=1, description="any other body limit (413 too_large)")
    max_inputs: int = Field(64, ge=1, description="inputs per predict")
    max_text_chars: int = Field(4096, ge=1, description="characters per text (each side of a pair)")
    max_list_limit: int = Field(1000, ge=1, description="largest page of GET /profiles")

    # auth: SecretStr keeps tokens out of reprs and logs
    admin_token: SecretStr | None = Field(None, description="bearer token for PUT and DELETE")
    api_token: SecretStr | None = Field(None, description="bearer token for reads and predict (admin works too)")

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True

    @model_validator(mode="after")
    def _empty_tokens_mean_none(self) -> Settings:
        # `XPEFT_ADMIN_TOKEN=` in a compose file means "no token", not "the empty token".
        for name in ("admin_token", "api_token"):
            value = getattr(self, name)
            if value is not None and not value.get_secret_value():
                setattr(self, name, None)
        if self.redis_url == "":
            self.redis_url = None
        return self
