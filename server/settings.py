"""Server settings: environment variables ``XPEFT_*``, overridden by ``xpeft serve`` flags.

One object carries every knob so that a replica's behaviour is fully described by its
environment (docker-compose sets nothing else).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The profile-id pattern (app.py checks ids with it); a tenant prefix is a valid id itself.
from xpeft.adapters.kernel_policy import parse_policy
from xpeft.engine.backends import BackendSetting
from xpeft.server.wire import DEFAULT_MAX_INPUTS, PROFILE_ID_PATTERN

_PROFILE_ID = re.compile(PROFILE_ID_PATTERN)
# Bearer tokens shorter than this are refused at startup: a short token can be guessed.
MIN_TOKEN_CHARS = 16


class Settings(BaseSettings):
    """All server settings; each field reads ``XPEFT_<FIELD NAME IN CAPITALS>``."""

    # hide_input_in_errors: a refused value may hold a token; errors must never echo it
    model_config = SettingsConfigDict(env_prefix="XPEFT_", extra="ignore", hide_input_in_errors=True)

    # what to serve
    bank: Path | None = Field(None, description="bank file (.safetensors); required")
    model: str | None = Field(
        None, description="encoder alias, folder or hub name; default: the bank's model_name, else minilm"
    )
    device: str | None = Field(None, description="torch device; default CUDA when present, else CPU")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    torch_threads: int | None = Field(None, ge=1, description="CPU threads of the model worker")
    kernels: str = Field(
        "auto",
        description="Triton kernels on CUDA: auto (those measured faster), off, all, or a list such as "
        "apply,gather; chosen once, when the model is built",
    )
    backend: BackendSetting = Field(
        "auto",
        description="what runs the encoder of a served batch: torch, torch-int8, onnx, onnx-int8, "
        "onnx-int8-block (CPU only; the onnx ones need the cpu-fast extra), or auto (onnx-int8 on a CPU when ONNX Runtime "
        "is installed, else torch); adapters and heads stay fp32; chosen once, at start",
    )
    retain_host_memory: bool = Field(
        True,
        description="CPU: keep freed host memory in the process (glibc's malloc stops giving large "
        "blocks back), so that a batch's buffers are not faulted in again; the resident size stays at its peak",
    )
    backend_cache: Path | None = Field(
        None,
        description="folder of exported encoder graphs (the onnx backends); default "
        "$XDG_CACHE_HOME/xpeft/backends",
    )

    # where to listen (used by `xpeft serve`)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    allow_open_writes: bool = Field(
        False,
        description="without an admin token, serve writes to anyone on a non-loopback address (never do)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection must send complete request headers within this, else closed"
    )

    # the profile store
    redis_url: str | None = Field(
        None, description="redis://... ; without it the embedded SQLite store serves"
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password (kept out of the URL, so it never shows in a process listing)"
    )
    redis_password_file: Path | None = Field(None, description="the Redis password in a file (a secret)")
    redis_prefix: str = Field(
        "xpeft", pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="key prefix (hash tag)"
    )
    sqlite_path: Path = Field(Path("xpeft-profiles.sqlite3"), description="embedded store file")
    store_timeout_s: float = Field(2.0, gt=0, description="one store operation, then 503 store_unavailable")
    version_check_s: float = Field(1.0, gt=0, description="safety-net check for missed invalidation events")

    # micro-batching
    max_batch_size: int = Field(64, ge=1, description="rows (texts) per forward")
    max_batch_tokens: int = Field(
        0,
        ge=0,
        description="padded tokens per forward (rows times the longest input); 0: 2048 on a CPU, 16384 on a GPU",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits to fill")
    max_queue: int = Field(1024, ge=1, description="queued requests before 503 overloaded")
    request_timeout_s: float = Field(
        30.0, gt=0, description="a predict taking longer (lookup, queue and forward) gets 504 timeout"
    )

    # caches
    profile_cache_size: int = Field(10_000, ge=1, description="decoded profiles kept on the host")
    profile_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="host memory for decoded profiles (tensors plus a fixed 4 KiB per profile)",
    )
    fused_cache_bytes: int = Field(
        256 * 2**20,
        ge=0,
        description="fused adapter weights kept on the device: a pool of slots allocated at startup",
    )
    head_cache_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description="classification heads kept beside the fused weights (each at its own label count)",
    )
    cuda_graphs: bool | None = Field(
        None,
        description="replay the forward from CUDA graphs per batch/length bucket; unset: on with CUDA",
    )

    # request limits
    max_profile_bytes: int = Field(4 * 2**20, ge=1, description="PUT body limit (413 too_large)")
    max_request_bytes: int = Field(2**20, ge=1, description="any other body limit (413 too_large)")
    max_inputs: int = Field(DEFAULT_MAX_INPUTS, ge=1, description="inputs per predict")
    max_text_chars: int = Field(4096, ge=1, description="characters per text (each side of a pair)")
    max_request_tokens: int = Field(
        32768,
        ge=0,
        description="one predict's padded tokens (inputs times the longest one's tokens) before 413 "
        "too_many_tokens; 0: no bound",
    )
    max_list_limit: int = Field(1000, ge=1, description="largest page of GET /profiles")
    max_in_flight: int = Field(
        2048,
        ge=1,
        description="requests handled at once (health, readiness and metrics aside) before 503 overloaded",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body must arrive within this (408 request_timeout)"
    )

    # graceful shutdown (SIGTERM): refuse new requests, let in-flight ones finish, then exit
    drain_timeout_s: float = Field(
        10.0, ge=0, description="after SIGTERM, how long in-flight requests may take"
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM, the least time new requests are still "
        "answered 503 shutting_down before the port closes",
    )

    # auth: SecretStr keeps tokens out of reprs and logs
    admin_token: SecretStr | None = Field(None, description="bearer token for PUT and DELETE")
    api_token: SecretStr | None = Field(
        None, description="bearer token for reads and predict (admin works too)"
    )
    predict_tokens: SecretStr | None = Field(
        None,
        description='per-tenant tokens, JSON {"<token>": ["<id prefix>", '
        "...]}: predict and read only those profiles",
    )
    predict_tokens_file: Path | None = Field(None, description="the same JSON in a file (a mounted secret)")
    admin_token_file: Path | None = Field(None, description="the admin token in a file (a mounted secret)")
    api_token_file: Path | None = Field(None, description="the API token in a file (a mounted secret)")

    # training as a service (POST /profiles/{id}/train; server/jobs/)
    embedded_trainer: bool = Field(
        True,
        description="with the SQLite store, run one trainer process beside the server (Redis: xpeft worker)",
    )
    train_threads: int = Field(1, ge=1, description="CPU threads of a trainer process")
    train_nice: int = Field(10, ge=0, le=19, description="niceness of a trainer process (serving goes first)")
    train_lease_s: float = Field(
        30.0, gt=0, description="a running job whose worker sent no heartbeat for this long fails"
    )
    train_heartbeat_s: float = Field(1.0, gt=0, description="how often a trainer reports progress")
    job_ttl_s: float = Field(7 * 86400.0, gt=0, description="how long finished job records are kept")
    max_job_records_per_tenant: int = Field(
        1000, ge=1, description="job records kept per tenant: as new jobs come, its oldest finished ones go"
    )
    max_jobs_page_bytes: int = Field(
        1 << 20, ge=4096, description="a GET /jobs page stops before its records pass this many bytes"
    )
    max_pending_jobs: int = Field(100, ge=1, description="queued and running jobs before 503 too_many_jobs")
    max_pending_jobs_per_tenant: int = Field(
        10, ge=1, description="one tenant's queued and running jobs before 503 too_many_jobs"
    )
    max_train_example_epochs: int = Field(
        200_000,
        ge=1,
        description="examples times epochs one job may ask for (422 training_too_large): bounds how "
        "long one job holds the trainer",
    )
    max_train_examples: int = Field(50_000, ge=2, description="labelled examples per training request")
    max_train_epochs: int = Field(50, ge=1, description="largest epochs a training request may ask for")
    max_label_chars: int = Field(100, ge=1, description="characters per label name")
    max_labels: int = Field(
        1000, ge=2, le=4096, description="distinct labels per training request and per uploaded profile"
    )

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = True
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines, or one JSON object per line (every logger, access log included)"
    )
    otel: bool | None = Field(
        None,
        description="OpenTelemetry tracing of requests (the otel extra); default: on when an "
        "OTEL_*_EXPORTER or OTEL_EXPORTER_OTLP_*ENDPOINT variable is set and the packages are installed",
    )

    # Redis Cluster (server/stores/redis_cluster_store.py)
    redis_cluster: bool = Field(
        False, description="XPEFT_REDIS_URL names a Redis Cluster node: profiles spread over every master"
    )
    redis_wait_replicas: int = Field(
        1, ge=0, description="cluster mode: a write is acknowledged once this many replicas hold it (WAIT)"
    )
    jobs_redis_url: str | None = Field(
        None,
        description="a plain Redis for the training queue and job records; required in cluster mode "
        "(Huey does not speak Redis Cluster); default XPEFT_REDIS_URL",
    )

    @model_validator(mode="after")
    def _cluster_mode_needs_a_plain_jobs_redis(self) -> Settings:
        if self.jobs_redis_url == "":
            self.jobs_redis_url = None
        if self.redis_cluster and not self.redis_url:
            raise ValueError("XPEFT_REDIS_CLUSTER needs XPEFT_REDIS_URL (any node of the cluster)")
        if self.redis_cluster and not self.jobs_redis_url:
            raise ValueError(
                "XPEFT_REDIS_CLUSTER needs XPEFT_JOBS_REDIS_URL: the training queue (Huey) and the job "
                "records live in a plain Redis, not in the cluster"
            )
        return self

    @field_validator("kernels")
    @classmethod
    def _known_kernels(cls, value: str) -> str:
        parse_policy(value)  # a ValueError naming the unknown kernels refuses the start
        return value.strip().lower() or "auto"

    def jobs_url(self) -> str | None:
        """The Redis of the training queue and job records (``None``: the SQLite file)."""
        return self.jobs_redis_url or self.redis_url

    @model_validator(mode="after")
    def _empty_tokens_mean_none(self) -> Settings:
        # `XPEFT_ADMIN_TOKEN=` in a compose file means "no token", not "the empty token".
        for name in ("admin_token", "api_token", "redis_password"):
            value = _secret_from_file(self, name)
            if value is not None and not value.get_secret_value():
                value = None
            setattr(self, name, value)
            if name != "redis_password" and value is not None:
                _check_token(f"XPEFT_{name.upper()}", value.get_secret_value())
        if self.redis_url == "":
            self.redis_url = None
        if self.predict_tokens is not None and not self.predict_tokens.get_secret_value().strip():
            self.predict_tokens = None
        tenants = self.tenant_prefixes()  # refuse a malformed table at startup, not at the first request
        if tenants and self.admin_token is None:
            raise ValueError(
                "predict tokens need XPEFT_ADMIN_TOKEN: without it anyone may overwrite any tenant's profiles"
            )
        if (
            self.admin_token is not None
            and self.api_token is not None
            and self.admin_token.get_secret_value() == self.api_token.get_secret_value()
        ):
            raise ValueError("XPEFT_ADMIN_TOKEN and XPEFT_API_TOKEN must differ: the API token may not write")
        others = {s.get_secret_value() for s in (self.admin_token, self.api_token) if s is not None}
        if others & tenants.keys():
            raise ValueError("a predict token must differ from the admin and API tokens")
        return self

    def tenant_prefixes(self) -> dict[str, tuple[str, ...]]:
        """Predict token -> the profile-id prefixes it may use, from both sources (file entries last).

        Error messages name an entry by position, never by its token.
        """
        sources: list[tuple[str, str]] = []
        if self.predict_tokens is not None:
            sources.append(("XPEFT_PREDICT_TOKENS", self.predict_tokens.get_secret_value()))
        if self.predict_tokens_file is not None:
            try:
                sources.append((str(self.predict_tokens_file), self.predict_tokens_file.read_text()))
            except OSError as exc:
                raise ValueError(f"cannot read predict_tokens_file: {exc.strerror}") from None
        table: dict[str, tuple[str, ...]] = {}
        for where, text in sources:
            try:
                raw = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
            except ValueError as exc:  # not JSON, or one token listed twice
                raise ValueError(
                    f"{where} is not JSON" if isinstance(exc, json.JSONDecodeError) else f"{where}: {exc}"
                ) from None
            if not isinstance(raw, dict):
                raise ValueError(f'{where} must be a JSON object {{"<token>": ["<prefix>", ...]}}')
            for n, (token, prefixes) in enumerate(raw.items(), 1):
                if not token or token != token.strip() or any(c.isspace() for c in token):
                    raise ValueError(f"{where}: token {n} is empty or holds whitespace")
                prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
                if (
                    not isinstance(prefixes, list)
                    or not prefixes
                    or not all(isinstance(p, str) and _PROFILE_ID.fullmatch(p) for p in prefixes)
                ):
                    raise ValueError(
                        f"{where}: token {n} needs a list of profile-id prefixes, each matching "
                        f"{PROFILE_ID_PATTERN}"
                    )
                if len(token) < MIN_TOKEN_CHARS:
                    raise ValueError(f"{where}: token {n} is shorter than {MIN_TOKEN_CHARS} characters")
                table[token] = tuple(prefixes)
        _refuse_overlapping_tenants(table)
        return table


def _check_token(name: str, token: str) -> None:
    """A bearer token as the server compares it: long enough, and only visible ASCII characters
    (the presented token is stripped, so one with a space or a newline in it could never match).
    The message never shows the token."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"{name} is shorter than {MIN_TOKEN_CHARS} characters: "
            "use a long random one, e.g. `openssl rand -hex 24`"
        )
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError(
            f"{name} holds whitespace or a character that is not visible ASCII: no client could send it"
        )


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json.loads``' object hook: a token listed twice would silently keep only its last prefixes."""
    table: dict[str, object] = {}
    for n, (key, value) in enumerate(pairs, 1):
        if key in table:
            raise ValueError(f"entry {n} repeats an earlier token")
        table[key] = value
    return table


def _secret_from_file(settings: Settings, name: str) -> SecretStr | None:
    """``XPEFT_<NAME>`` or ``XPEFT_<NAME>_FILE`` (one trailing newline dropped), never both.

    Errors name the file and the reason, never its content.
    """
    value: SecretStr | None = getattr(settings, name)
    path: Path | None = getattr(settings, f"{name}_file")
    if path is None:
        return value
    if value is not None and value.get_secret_value():
        raise ValueError(f"set XPEFT_{name.upper()} or XPEFT_{name.upper()}_FILE, not both")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {name}_file {path}: {exc.strerror}") from None
    return SecretStr(text.removesuffix("\n").removesuffix("\r"))


def _refuse_overlapping_tenants(table: dict[str, tuple[str, ...]]) -> None:
    """Two tenants whose prefixes nest (``acme-`` and ``acme-eu-``) would read each other's profiles.

    Tokens with the same set of prefixes are one tenant (two tokens while one is rotated).
    """
    owner: dict[str, int] = {}
    tenant_of: dict[frozenset[str], int] = {}
    for n, prefixes in enumerate(table.values(), 1):
        n = tenant_of.setdefault(frozenset(prefixes), n)
        for prefix in prefixes:
            if owner.setdefault(prefix, n) != n:
                _overlap(owner[prefix], n, prefix, prefix)
    for prefix, n in owner.items():
        for end in range(1, len(prefix)):
            other = owner.get(prefix[:end])
            if other is not None and other != n:
                _overlap(other, n, prefix[:end], prefix)


def _overlap(a: int, b: int, shorter: str, longer: str) -> None:
    raise ValueError(
        f"predict tokens {a} and {b} overlap: prefix {shorter!r} also covers {longer!r}, so one tenant "
        "could use the other's profiles; make the prefixes disjoint"
    )
