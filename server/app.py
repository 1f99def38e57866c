"""The FastAPI app factory: wiring of store, caches, batcher, worker and routes; no globals.

``create_app(settings)`` loads the bank and opens the store at once (so a wrong path fails
before the server listens); the encoder loads in the background after startup, so ``/healthz``
answers immediately and ``/readyz`` turns 200 once predictions can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path as FilePath

import torch
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import DEFAULT_MODEL, TextInput, load_encoder
from xpeft.adapters.errors import XPeftError
from xpeft.profiles import format as xpm
from xpeft.profiles.runtime import MultiProfileModel, best_device
from xpeft.server.auth import (
    Authorizer,
    check_exposure,
    require_admin,
    require_profile_access,
    require_reader,
)
from xpeft.server.batcher import MicroBatcher, Overloaded
from xpeft.server.cache import FusedCache, ProfileCache, VersionFloors
from xpeft.server.errors import ApiError, install_error_handlers
from xpeft.server.metrics import Metrics
from xpeft.server.middleware import (
    Admission,
    AdmissionMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    redact_access_log,
)
from xpeft.server.schemas import (
    BodyError,
    ErrorBody,
    Health,
    PredictRequest,
    PredictResponse,
    ProfileList,
    ProfileMeta,
    parse_predict_body,
)
from xpeft.server.settings import PROFILE_ID_PATTERN, Settings
from xpeft.server.stores import ProfileStore, open_store
from xpeft.server.sync import CacheSync
from xpeft.server.worker import ModelWorker

log = logging.getLogger("xpeft.server")

PROFILE_ID = re.compile(PROFILE_ID_PATTERN)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ServerState:
    """Everything one app instance owns (``app.state.server``)."""

    settings: Settings
    metrics: Metrics
    store: ProfileStore
    bank: AdapterBank
    profiles: ProfileCache
    worker: ModelWorker
    batcher: MicroBatcher
    sync: CacheSync
    auth: Authorizer
    admission: Admission
    model_error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def model_ready(self) -> bool:
        return self.worker.model is not None

    async def drain(self) -> int:
        """After SIGTERM: refuse new requests, wait for those in flight, then answer any still queued.

        Waits at least ``drain_delay_s`` (load balancers see /readyz turn 503 and stop sending) and
        at most ``drain_delay_s + drain_timeout_s``. Returns how many requests were still in flight.
        """
        settings = self.settings
        self.admission.begin_drain()
        log.warning(
            "shutting down: refusing new requests, draining %d in flight (at most %g s)",
            self.admission.in_flight,
            settings.drain_delay_s + settings.drain_timeout_s,
        )
        await asyncio.sleep(settings.drain_delay_s)
        if await self.admission.wait_idle(settings.drain_timeout_s):
            return 0
        left = self.admission.in_flight
        log.warning(
            "drain timeout: %d requests still in flight; queued predictions get 503 shutting_down", left
        )
        self.batcher.fail_pending(ApiError(503, "shutting_down", "the server is shutting down"))
        return left


def _package_version() -> str:
    try:
        return version("xpeft")
    except PackageNotFoundError:
        return "0"


def build_model(settings: Settings, bank: AdapterBank) -> MultiProfileModel:
    """The encoder the settings name (default: the bank's own), on the best device, with ``bank``."""
    device = settings.device or best_device()
    encoder = load_encoder(
        settings.model or bank.model_name or DEFAULT_MODEL, device=device, dtype=_DTYPES[settings.dtype]
    )
    return MultiProfileModel(encoder, bank)


def create_app(settings: Settings | None = None, model: MultiProfileModel | None = None) -> FastAPI:
    """A ready-to-serve app. ``model`` (with its bank) skips loading: for notebooks and tests."""
    settings = settings or Settings()
    check_exposure(settings)
    if model is not None:
        bank = model.bank
    elif settings.bank is None:
        raise XPeftError("bad_argument", "no bank: pass --bank or set XPEFT_BANK")
    else:
        check_readable(settings.bank)
        bank = AdapterBank.load(settings.bank)
    redact_access_log()
    metrics = Metrics()
    store = open_store(settings)
    floors = VersionFloors()
    fused = FusedCache(settings.fused_cache_bytes, floors, metrics)
    profiles = ProfileCache(
        store,
        lambda data: xpm.decode(data, bank),
        settings.profile_cache_size,
        fused,
        metrics,
        max_bytes=settings.profile_cache_bytes,
    )
    worker = ModelWorker(fused, metrics, settings.torch_threads)
    batcher = MicroBatcher(
        worker.run_async, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue, metrics
    )
    state = ServerState(
        settings,
        metrics,
        store,
        bank,
        profiles,
        worker,
        batcher,
        CacheSync(store, profiles, metrics, settings.version_check_s),
        Authorizer(settings),
        Admission(settings.max_in_flight, metrics),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if model is not None:
            worker.model = model
            metrics.model_ready.set(1)
        else:
            state.tasks.append(asyncio.create_task(_load_model(state), name="xpeft-load-model"))
        state.tasks.append(asyncio.create_task(batcher.run(), name="xpeft-batcher"))
        state.tasks.append(asyncio.create_task(state.sync.run(), name="xpeft-cache-sync"))
        try:
            yield
        finally:
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            batcher.fail_pending(ApiError(503, "shutting_down", "the server is shutting down"))
            await store.close()
            worker.shutdown()

    app = FastAPI(
        title="xpeft",
        version=_package_version(),
        lifespan=lifespan,
        description="Multi-profile X-PEFT inference: one frozen encoder and adapter bank, many profiles.",
        responses={
            401: {"model": ErrorBody},
            403: {"model": ErrorBody},
            408: {"model": ErrorBody},
            413: {"model": ErrorBody},
            422: {"model": ErrorBody},
            503: {"model": ErrorBody},
        },
    )
    app.openapi = lambda: _openapi_with_limits(app, settings)  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_profile_bytes=settings.max_profile_bytes,
        max_request_bytes=settings.max_request_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(AdmissionMiddleware, admission=state.admission)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it also counts 413s and refusals
    app.include_router(router)
    return app


def check_readable(path: FilePath) -> None:
    """A bank the server's user cannot read is a deployment error with its own clear message
    (safetensors alone reports it as "No such file or directory")."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise XPeftError("bank_not_found", f"no bank file at {path}") from None
    except PermissionError:
        raise XPeftError(
            "bank_unreadable",
            f"cannot read bank {path}: permission denied (the server runs as uid {os.getuid()}; "
            "make the file readable by it, e.g. chmod 0644)",
        ) from None
    except OSError as exc:
        raise XPeftError("bank_unreadable", f"cannot read bank {path}: {exc.strerror}") from None


def _openapi_with_limits(app: FastAPI, settings: Settings) -> dict:
    """The generated schema plus this replica's limits, so that a client (or a fuzzer) generating
    valid requests from it is never refused for a limit the schema did not state."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        # The predict route parses its body itself (sizes before items), so the model is added here.
        request_schema = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schema["components"]["schemas"]["PredictRequest"] = request_schema
        inputs = request_schema["properties"]["inputs"]
        inputs.update(minItems=1, maxItems=settings.max_inputs)
        for variant in inputs["items"]["anyOf"]:
            for text in variant.get("prefixItems", [variant]):
                text["maxLength"] = settings.max_text_chars
        for param in schema["paths"]["/profiles"]["get"]["parameters"]:
            if param["name"] == "limit":
                param["schema"]["anyOf"][0]["maximum"] = settings.max_list_limit
        app.openapi_schema = schema
    return app.openapi_schema


async def _load_model(state: ServerState) -> None:
    loop = asyncio.get_running_loop()
    try:
        state.worker.model = await loop.run_in_executor(
            state.worker.executor, build_model, state.settings, state.bank
        )
    except Exception as exc:  # reported by /healthz and /readyz; the process cannot recover by itself
        state.model_error = f"{getattr(exc, 'code', type(exc).__name__)}: {getattr(exc, 'message', exc)}"
        log.error("model failed to load: %s", state.model_error)
        return
    state.metrics.model_ready.set(1)
    model = state.worker.model
    log.info(
        "model ready: encoder %s on %s, bank %s (L=%d N=%d)",
        model.encoder.name,
        model.encoder.device,
        state.bank.bank_id,
        state.bank.num_layers,
        state.bank.num_adapters,
    )


# -- routes ----------------------------------------------------------------------------------
router = APIRouter()
_OCTET_BODY = {
    "requestBody": {
        "required": True,
        "description": "the .xpm profile file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# The pattern is in the OpenAPI schema; _check_id enforces it with the stable code invalid_profile_id.
_ID_DOC = "1 to 128 characters: letters, digits, '.', '_', '-'; the first a letter or digit"
ProfileIdPath = Path(..., description=_ID_DOC, json_schema_extra={"pattern": PROFILE_ID_PATTERN})


def _server(request: Request) -> ServerState:
    return request.app.state.server


def _check_id(profile_id: str) -> str:
    if not PROFILE_ID.fullmatch(profile_id):
        raise ApiError(
            422,
            "invalid_profile_id",
            f"profile ids match {PROFILE_ID.pattern} (1 to 128 characters); got {profile_id[:200]!r}",
        )
    return profile_id


def _not_found(profile_id: str) -> ApiError:
    return ApiError(404, "profile_not_found", f"no profile with id {profile_id!r}")


def _validate_profile(data: bytes, bank: AdapterBank) -> dict:
    """Decode all of it against the served bank (any ProfileFormatError refuses the upload)."""
    try:
        xpm.decode(data, bank)
        info = xpm.read_info(data)
        if type(info.max_length) is not int:  # JSON true passes an isinstance(int) check
            raise xpm.ProfileFormatError("bad_header", f"max_length={info.max_length!r} is not an integer")
    except xpm.ProfileFormatError:
        raise
    except Exception as exc:
        # Untrusted bytes that trip the decoder itself (a header field of an unexpected type, say) are
        # still a malformed file: refuse it (422), never a 500; the traceback shows the decoder's gap.
        log.warning("the profile decoder failed on an upload; refusing it", exc_info=True)
        raise xpm.ProfileFormatError(
            "bad_header", f"the file could not be decoded ({type(exc).__name__})"
        ) from exc
    return {**info.as_dict(), "sha256": hashlib.sha256(data).hexdigest()}


@router.put(
    "/profiles/{profile_id}",
    response_model=ProfileMeta,
    dependencies=[Depends(require_admin)],
    openapi_extra=_OCTET_BODY,
    tags=["profiles"],
    responses={201: {"model": ProfileMeta, "description": "created"}, 409: {"model": ErrorBody}},
)
async def put_profile(request: Request, response: Response, profile_id: str = ProfileIdPath) -> dict:
    """Upload (create or replace) a profile: 201 when new, 200 when replaced; nothing is stored if refused."""
    _check_id(profile_id)
    state = _server(request)
    data = await request.body()
    meta = await asyncio.to_thread(_validate_profile, data, state.bank)
    record, created = await state.metrics.timed_store("put", state.store.put(profile_id, data, meta))
    state.profiles.invalidate(profile_id, record.version)  # this replica reads its own write at once
    response.status_code = 201 if created else 200
    return record.as_dict()


@router.get(
    "/profiles/{profile_id}",
    response_model=ProfileMeta,
    dependencies=[Depends(require_profile_access)],
    tags=["profiles"],
    responses={404: {"model": ErrorBody}},
)
async def get_profile(request: Request, profile_id: str = ProfileIdPath) -> dict:
    """A profile's metadata and current version."""
    _check_id(profile_id)
    state = _server(request)
    record = await state.metrics.timed_store("get_record", state.store.get_record(profile_id))
    if record is None:
        raise _not_found(profile_id)
    return record.as_dict()


@router.delete(
    "/profiles/{profile_id}",
    dependencies=[Depends(require_admin)],
    tags=["profiles"],
    responses={404: {"model": ErrorBody}},
)
async def delete_profile(request: Request, profile_id: str = ProfileIdPath) -> dict:
    """Delete a profile; every replica stops serving it within a second."""
    _check_id(profile_id)
    state = _server(request)
    deleted = await state.metrics.timed_store("delete", state.store.delete(profile_id))
    if deleted is None:
        raise _not_found(profile_id)
    state.profiles.invalidate(profile_id, deleted)
    return {"id": profile_id, "deleted": True, "version": deleted}


@router.get(
    "/profiles", response_model=ProfileList, dependencies=[Depends(require_reader)], tags=["profiles"]
)
async def list_profiles(
    request: Request,
    cursor: str | None = Query(
        None,
        description="next_cursor of the last page (a profile id)",
        json_schema_extra={"pattern": PROFILE_ID_PATTERN},
    ),
    limit: int | None = Query(
        None, ge=1, description="page size (default 100, at most XPEFT_MAX_LIST_LIMIT)"
    ),
) -> dict:
    """Profiles in id order, one page at a time."""
    state = _server(request)
    limit = limit or min(100, state.settings.max_list_limit)
    if limit > state.settings.max_list_limit:
        raise ApiError(422, "invalid_request", f"limit must be at most {state.settings.max_list_limit}")
    if cursor is not None:
        _check_id(cursor)
    records, next_cursor = await state.metrics.timed_store("list", state.store.list(cursor, limit))
    return {"profiles": [r.as_dict() for r in records], "next_cursor": next_cursor}


async def _inputs(request: Request, settings: Settings) -> list[TextInput]:
    """Read the body only now, after the token check (a dependency), and parse it with its sizes
    checked first (see :func:`parse_predict_body`)."""
    raw = await request.body()
    try:
        return parse_predict_body(
            raw, request.headers.get("content-type"), settings.max_inputs, settings.max_text_chars
        )
    except BodyError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None


_JSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
    }
}


@router.post(
    "/profiles/{profile_id}/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_profile_access)],
    openapi_extra=_JSON_BODY,
    tags=["predict"],
    responses={404: {"model": ErrorBody}, 504: {"model": ErrorBody}},
)
async def predict(request: Request, profile_id: str = ProfileIdPath) -> dict:
    """Labels and scores for each input, all from one version of the profile."""
    _check_id(profile_id)
    state = _server(request)
    inputs = await _inputs(request, state.settings)
    if not state.model_ready:
        raise ApiError(
            503, "not_ready", state.model_error or "the model is still loading", headers={"Retry-After": "1"}
        )
    timeout = state.settings.request_timeout_s
    try:  # one deadline for all of it: store lookup, queue and forward
        return await asyncio.wait_for(_predict(state, profile_id, inputs), timeout)
    except asyncio.TimeoutError as exc:
        raise ApiError(504, "timeout", f"no answer within {timeout:g} s") from exc


async def _predict(state: ServerState, profile_id: str, inputs: list[TextInput]) -> dict:
    entry = await state.profiles.get(profile_id)
    if entry is None:
        raise _not_found(profile_id)
    try:
        future = state.batcher.submit(entry, inputs)
    except Overloaded as exc:
        raise ApiError(
            503, "overloaded", f"the server is busy: {exc}; retry later", headers={"Retry-After": "1"}
        ) from exc
    predictions = await future
    return {
        "profile": profile_id,
        "version": entry.version,
        "predictions": [p.as_dict() for p in predictions],
    }


@router.api_route("/profiles/{rest:path}", methods=["GET", "PUT", "DELETE", "POST"], include_in_schema=False)
async def bad_profile_path(rest: str, request: Request) -> None:
    """Ids with a slash (or other paths under /profiles/): a clear refusal instead of a bare 404."""
    head, _, tail = rest.partition("/")
    if tail == "predict" and PROFILE_ID.fullmatch(head):
        raise ApiError(405, "method_not_allowed", "predict takes POST", headers={"Allow": "POST"})
    _check_id(rest)
    raise ApiError(
        405,
        "method_not_allowed",
        f"{request.method} is not allowed on a profile",
        headers={"Allow": "DELETE, GET, PUT"},
    )


@router.get("/healthz", response_model=Health, tags=["ops"])
async def healthz(request: Request) -> dict:
    """The process is alive (and its model did not fail to load)."""
    state = _server(request)
    if state.model_error:
        raise ApiError(503, "model_failed", state.model_error)
    return {"status": "ok", "detail": {"model_loaded": state.model_ready}}


@router.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict:
    """Ready to predict: the model is loaded and the store answers."""
    state = _server(request)
    if state.admission.draining:
        raise ApiError(503, "shutting_down", "this replica is shutting down")
    if not state.model_ready:
        raise ApiError(503, "not_ready", state.model_error or "the model is still loading")
    await state.metrics.timed_store("ping", state.store.ping())
    model = state.worker.model
    assert model is not None
    return {
        "status": "ready",
        "detail": {
            "store": state.store.kind,
            "bank_id": state.bank.bank_id,
            "model_id": model.encoder.model_id,
            "model": model.encoder.name,
            "device": str(model.encoder.device),
        },
    }


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        }
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
